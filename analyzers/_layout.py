"""The job's parallel layout, from who shares groups and send/recv pairs with whom.

No configuration: the groups in the rows say it. Point-to-point pairs that chain ranks into
paths are pipelines; a rank's position on its path is its stage (stage 0 is the end that sends
first: the forward pass starts there). An interleaved pipeline (Megatron-LM's virtual stages:
each rank holds several model chunks) closes the path into a ring, the last stage sending on to
the first; that pair carries fewer messages than the others (the last chunk goes nowhere, the
first comes from the data), and the ring is opened there. A ring whose pairs all carry alike
(context parallel's ring attention) is no pipeline. Collective groups that stay within one
stage are that stage's tensor- and data-parallel groups: of two families of groups that split a
stage, the one with more collectives per step is tensor parallel (an all-reduce per layer in
forward and backward), the other data parallel (the gradients once a step). A group over
several stages (the world, an embedding group tying the first and last stage) is left out.

What the analyzers take from it is *symmetry*: ranks of one stage do the same work by
construction (tensor-parallel peers, data-parallel replicas), so a rank slower than its stage's
other ranks is a fault, from the first step or later; ranks of different stages may differ by
design. Without a pipeline every rank is in one class. A declared layout
(``tp=4,pp=2,dp=2``: Megatron's default order, tensor-parallel index fastest, then replica,
then stage) overrides the inference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl

from ringwatch._schema import parse_ranks


@dataclass(frozen=True)
class Layout:
    """A job's parallel layout.

    Attributes:
        stage: ``rank -> pipeline stage`` (every rank; 0 without a pipeline).
        pp: Pipeline stages (1: none found).
        tp: Ranks per tensor-parallel group (1: none found).
        dp: Data-parallel replicas of a stage (1: none found).
        replica: ``rank -> its tensor-parallel group`` (the ranks that share one batch; an
            index), when there are such groups.
        tp_groups, dp_groups: The groups (pg names) of each kind.
        source: ``inferred`` or ``declared``.
        notes: What could not be placed, in words.
    """

    stage: dict[int, int]
    replica: dict[int, int] | None = None
    pp: int = 1
    tp: int = 1
    dp: int = 1
    tp_groups: tuple[str, ...] = ()
    dp_groups: tuple[str, ...] = ()
    source: str = "inferred"
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: ``dp=2 x tp=2 x pp=2 (inferred from the groups and send/recv pairs)``."""
        how = ("inferred from the groups and send/recv pairs" if self.source == "inferred"
               else "declared")
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp} ({how})"

    def peers_frame(self) -> pl.DataFrame:
        """``rank``, ``role`` (the symmetry class of each rank: its stage) and ``replica``
        (its tensor-parallel group, or the rank itself)."""
        rep = self.replica or {}
        ranks = list(self.stage)
        return pl.DataFrame({"rank": ranks, "role": [self.stage[r] for r in ranks],
                             "replica": [rep.get(r, 100_000 + r) for r in ranks]},
                            schema={"rank": pl.Int32, "role": pl.Int32, "replica": pl.Int32})


def parse_layout(spec: str, world: int) -> Layout:
    """A declared layout: ``tp=T,pp=P,dp=D`` (any order; missing sizes are 1, or the rest of
    the world for dp). Raises ``ValueError`` on a spec that does not fit ``world`` ranks."""
    sizes = {"tp": 1, "pp": 1}
    dp = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key not in ("tp", "pp", "dp") or not val.isdigit() or int(val) < 1:
            raise ValueError(f"layout {spec!r}: expected tp=N,pp=N,dp=N")
        if key == "dp":
            dp = int(val)
        else:
            sizes[key] = int(val)
    tp, pp = sizes["tp"], sizes["pp"]
    if dp is None:
        dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
    if dp < 1 or tp * pp * dp != world:
        raise ValueError(f"layout {spec!r}: tp x pp x dp must be the {world} ranks")
    per_stage = dp * tp
    return Layout(stage={r: r // per_stage for r in range(world)},
                  replica={r: r // tp for r in range(world)} if tp > 1 else None,
                  pp=pp, tp=tp, dp=dp, source="declared")


def infer_layout(events: pl.DataFrame, stage: Mapping[int, int] | None = None,
                 rates: Mapping[str, float] | None = None,
                 chains: Mapping[int, int] | None = None) -> Layout:
    """The layout of the job whose rows ``events`` are (see the module). The live service
    has no rows, but step totals: it gives ``stage`` (from the agents' send/recv peers:
    :func:`stages_from_pairs`), ``chains`` (:func:`chains_from_pairs`, from the same peers)
    and ``rates`` (each group's collectives per step).

    Without tensor-parallel groups, a pipeline's chain is the replica: its ranks, one per
    stage, share one batch."""
    ranks = sorted(int(r) for r in events["rank"].drop_nulls().unique())
    if stage is None:
        stage, notes, pairs = _stages(events, ranks)
        chains = chains_from_pairs(pairs) if chains is None else chains
    else:
        stage, notes = dict(stage), ()
    pp = len(set(stage.values()))
    tp_groups, dp_groups, tp, dp = _stage_groups(events, stage, len(ranks), rates)
    replica = None
    if tp_groups:
        specs = dict(events.lazy().select(pl.col("pg").cast(pl.Utf8),
                                          pl.col("pg_ranks").cast(pl.Utf8))
                     .filter(pl.col("pg").is_in(list(tp_groups))).unique("pg")
                     .collect().iter_rows())
        replica = {r: i for i, pg in enumerate(sorted(specs)) for r in parse_ranks(specs[pg])}
    elif pp > 1 and chains and all(r in chains for r in ranks):
        replica = {r: int(chains[r]) for r in ranks}
    return Layout(stage=stage, replica=replica, pp=pp, tp=tp, dp=dp, tp_groups=tp_groups,
                  dp_groups=dp_groups, notes=notes)


def _stages(events: pl.DataFrame, ranks: list[int]
            ) -> tuple[dict[int, int], tuple[str, ...], list[tuple[int, int]]]:
    """``rank -> stage`` from the send/recv pairs (every rank at 0 when they chain no path),
    the notes, and the pairs."""
    if "is_p2p" not in events.columns or "peer" not in events.columns:
        return {r: 0 for r in ranks}, (), []
    # the columns used first: a filter of every column copies them all (millions of rows)
    p2p = (events.select("rank", "peer", "op", "idx", "is_p2p")
           .filter(pl.col("is_p2p") & pl.col("peer").is_not_null()
                   & (pl.col("peer") != pl.col("rank"))).drop("is_p2p"))
    first_op = dict(p2p.sort("idx").group_by("rank", maintain_order=True)
                    .agg(pl.col("op").first()).iter_rows())
    per = p2p.group_by("rank", "peer").len().rows()
    pairs = [(int(r), int(q)) for r, q, _ in per]
    return (*stages_from_pairs(ranks, pairs, first_op, pair_counts(per)), pairs)


def pair_counts(per: Iterable[tuple[int, int, float]]) -> dict[tuple[int, int], float]:
    """``(low rank, high rank) -> ops`` from each rank's ops with each peer (``(rank, peer,
    ops)``): both ranks' rows of one pair summed."""
    out: dict[tuple[int, int], float] = defaultdict(float)
    for r, q, n in per:
        out[min(int(r), int(q)), max(int(r), int(q))] += float(n)
    return dict(out)


def chains_from_pairs(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """``rank -> its chain`` (an index, by lowest rank): the ranks linked by send/recv
    pairs, one pipeline each (a rank on none is left out)."""
    from ringwatch.analyzers._islands import linked

    low = linked(pairs)
    index = {h: i for i, h in enumerate(sorted(set(low.values())))}
    return {r: index[h] for r, h in low.items()}


def stages_from_pairs(ranks: Iterable[int], pairs: Iterable[tuple[int, int]],
                      first_op: Mapping[int, str],
                      counts: Mapping[tuple[int, int], float] | None = None
                      ) -> tuple[dict[int, int], tuple[str, ...]]:
    """``(rank -> stage, notes)`` from who sends to or receives from whom: ``pairs`` of
    global ranks, and each rank's first send/recv op (``first_op``: stage 0 is the end of a
    chain whose first op is a send). A ring is opened at its pair with the fewest ops
    (``counts``: :func:`pair_counts`; see the module). Every rank is at stage 0 when the
    pairs chain no path."""
    ranks = sorted(ranks)
    flat = {r: 0 for r in ranks}
    adj: dict[int, set[int]] = defaultdict(set)
    for a, b in pairs:
        if a != b:
            adj[int(a)].add(int(b))
            adj[int(b)].add(int(a))
    if not adj:
        return flat, ()
    stage, seen = dict(flat), set()
    lengths = set()
    for start in sorted(adj):
        if start in seen:
            continue
        comp, todo = [], [start]
        seen.add(start)
        while todo:
            r = todo.pop()
            comp.append(r)
            for n in adj[r]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        ends = [r for r in comp if len(adj[r]) == 1]
        cut = _ring_cut(comp, adj, counts or {})
        if cut is not None:  # an interleaved pipeline: its ends are the light pair's
            ends = list(cut)
        elif len(ends) != 2 or any(len(adj[r]) > 2 for r in comp):
            note = (f"send/recv among ranks {min(comp)}..{max(comp)} form no chain (not a "
                    "pipeline): no stages")
            return flat, (note,)
        # stage 0 is the end whose first point-to-point op is a send (the forward starts)
        head = min(ends, key=lambda r: (str(first_op.get(r)) != "send", r))
        order = [head]
        prev = next(r for r in ends if r != head) if cut is not None else None
        while len(order) < len(comp):
            nxt = next(n for n in adj[order[-1]] if n != prev)
            prev = order[-1]
            order.append(nxt)
        for i, r in enumerate(order):
            stage[r] = i
        lengths.add(len(order))
    if len(lengths) != 1:
        return flat, (f"pipelines of different lengths {sorted(lengths)}: no stages",)
    loose = [r for r in ranks if r not in seen]
    if loose:
        return flat, (f"ranks {loose[:8]} are on no pipeline: no stages",)
    return stage, ()


#: A ring is opened at a pair that carries at most this share of the next lightest's ops: an
#: interleaved pipeline of v chunks gives (v - 1) / v (7/8 at 8 chunks); a ring whose pairs
#: carry alike, save for the steps in flight, is none.
RING_CUT_SHARE = 0.9


def _ring_cut(comp: list[int], adj: Mapping[int, set[int]],
              counts: Mapping[tuple[int, int], float]) -> tuple[int, int] | None:
    """The pair to open a ring of 3 or more ranks at, or None (not a ring, or no pair
    clearly lighter than the others)."""
    if len(comp) < 3 or any(len(adj[r]) != 2 for r in comp):
        return None
    edges = sorted({(min(r, q), max(r, q)) for r in comp for q in adj[r]},
                   key=lambda e: counts.get(e, 0.0))
    light, nxt = counts.get(edges[0], 0.0), counts.get(edges[1], 0.0)
    if nxt <= 0 or light > RING_CUT_SHARE * nxt:
        return None
    return edges[0]


def _stage_groups(events: pl.DataFrame, stage: dict[int, int], world: int,
                  rates: Mapping[str, float] | None = None
                  ) -> tuple[tuple[str, ...], tuple[str, ...], int, int]:
    """(tp groups, dp groups, tp, dp): the two families of groups that split the stages."""
    coll = events.lazy().select("pg", "pg_ranks", "step", *(
        ["is_p2p"] if "is_p2p" in events.columns else []))
    if "is_p2p" in events.columns:
        coll = coll.filter(~pl.col("is_p2p"))
    per = (coll.group_by("pg").agg(pl.col("pg_ranks").first(), pl.len().alias("_n"),
                                   pl.col("step").n_unique().alias("_steps"))
           .filter(pl.col("pg_ranks").is_not_null()).collect())
    by_size: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for pg, spec, n, steps in per.iter_rows():
        try:
            members = parse_ranks(str(spec))
        except ValueError:
            continue
        if len(members) < 2 or len(members) >= world:
            continue
        if len({stage.get(r) for r in members}) != 1:
            continue  # over several stages (an embedding group): no symmetry to read
        rate = n / max(1, steps) if rates is None else rates.get(str(pg), 0.0)
        by_size[len(members)].append((str(pg), rate))
    per_stage = world // max(1, len(set(stage.values())))
    fams = {s: g for s, g in by_size.items() if per_stage % s == 0}
    pairs = [(a, b) for a in fams for b in fams if a * b == per_stage and a <= b]
    if not pairs:
        if len(fams) == 1:  # one family: tensor or data parallel, by how often it runs
            (size, groups), = fams.items()
            busy = sum(r for _, r in groups) / len(groups)
            names = tuple(sorted(g for g, _ in groups))
            return (names, (), size, 1) if busy > 4 else ((), names, 1, size)
        return (), (), 1, 1
    a, b = pairs[0]
    rate = {s: sum(r for _, r in fams[s]) / len(fams[s]) for s in (a, b)}
    tp_size, dp_size = (a, b) if rate[a] >= rate[b] else (b, a)
    if a == b:  # the same size: the busier groups are tensor parallel
        groups = sorted(fams[a], key=lambda g: -g[1])
        half = len(groups) // 2
        return (tuple(sorted(g for g, _ in groups[:half])),
                tuple(sorted(g for g, _ in groups[half:])), a, a)
    return (tuple(sorted(g for g, _ in fams[tp_size])),
            tuple(sorted(g for g, _ in fams[dp_size])), tp_size, dp_size)
