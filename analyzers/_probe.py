"""Reading a pairwise probe's bandwidth matrix as C4 does: a slow row is the sender side of its
host, a slow column the receiver side, a single slow cell (or a pair of symmetric cells) that
link.

``bw[i][j]`` is the point-to-point bandwidth from sender ``i`` to receiver ``j`` in MB/s
(``None`` where not measured: the diagonal, pairs on one host). Pure functions, no I/O: the
caller loads the probe's JSON (``ringwatch._probe``) and passes the dict.

The healthy level is the median of the upper half of the measured cells: the median of all
cells would do while fewer than half are slow, but a host slow both ways on 3 or 4 hosts
slows 4 of 6 or 6 of 12 cells. A cell is slow below ``ratio`` x that level, and, when the
samples are known, its best sample too: other load on a host only ever lowers a sample, so a
cell with one healthy sample had a healthy link under a busy CPU. A row (column) is
slow when more than ``share`` of its measured cells are, not counting the cells it shares with
a column (row) that is itself slow that way; slow cells no slow row or column explains are
links. With 2 hosts a row, a column and a cell are the same cell, and the verdict says so.

The latency matrix is quoted, never judged: a round trip crosses both directions, so it cannot
tell a sender from a receiver.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ringwatch.analyzers._findings import Finding

FORMAT = "ringwatch-probe/1"
RATIO = 0.5  # a cell below half the healthy level is slow
SHARE = 0.5  # a row/column with more than half of its cells slow is slow

Matrix = Sequence[Sequence[float | None]]


@dataclass(frozen=True, slots=True)
class ProbeMatrix:
    """A probe result, validated.

    Attributes:
        hosts: Host of each rank (row/column labels).
        ranks: Global rank of each row/column.
        bw_MBps: ``[sender][receiver]`` bandwidth, 10^6 bytes/s (median), ``None``: not measured.
        bw_best_MBps: The best sample of each cell, when the result holds the samples.
        lat_us: ``[sender][receiver]`` small-message latency, µs (round trip / 2, median).
        size_bytes: Bandwidth message size.
        repeats: Bandwidth samples per cell.
        backend: ``gloo`` or ``nccl``.
        schedule: ``serial`` or ``rounds``.
        started_wall_ns: When the measurement started (rank 0's wall clock).
    """

    hosts: tuple[str, ...]
    ranks: tuple[int, ...]
    bw_MBps: tuple[tuple[float | None, ...], ...]
    lat_us: tuple[tuple[float | None, ...], ...]
    size_bytes: int
    repeats: int
    backend: str
    schedule: str
    started_wall_ns: int | None = None
    bw_best_MBps: tuple[tuple[float | None, ...], ...] | None = None


def _best(samples, n: int):
    if samples is None:
        return None
    if not isinstance(samples, Sequence) or len(samples) != n or \
            any(not isinstance(r, Sequence) or len(r) != n for r in samples):
        raise ValueError(f"probe result: bw_samples_MBps is not a {n} x {n} matrix")
    return _square("bw_samples_MBps (best)",
                   [[max(c) if c else None for c in row] for row in samples], n)


def _square(name: str, m, n: int) -> tuple[tuple[float | None, ...], ...]:
    if not isinstance(m, Sequence) or len(m) != n or \
            any(not isinstance(r, Sequence) or len(r) != n for r in m):
        raise ValueError(f"probe result: {name} is not a {n} x {n} matrix")
    out = []
    for i, row in enumerate(m):
        cells = []
        for j, v in enumerate(row):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"probe result: {name}[{i}][{j}] = {v!r}, expected > 0")
            cells.append(None if v is None or i == j else float(v))
        out.append(tuple(cells))
    return tuple(out)


def read_probe_matrix(doc: Mapping) -> ProbeMatrix:
    """Validate a probe result (the JSON ``ringwatch._probe`` writes, loaded) into a
    :class:`ProbeMatrix`.

    Raises:
        ValueError: Not a ``ringwatch-probe/1`` result, or malformed matrices.
    """
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
        raise ValueError(f"not a probe result (format {got!r}, expected {FORMAT!r})")
    hosts = doc.get("hosts")
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ValueError("probe result: hosts must be a list of names")
    n = len(hosts)
    ranks = doc.get("ranks", list(range(n)))
    if not isinstance(ranks, list) or len(ranks) != n:
        raise ValueError(f"probe result: ranks must list {n} ranks")
    return ProbeMatrix(
        hosts=tuple(hosts), ranks=tuple(int(r) for r in ranks),
        bw_MBps=_square("bw_MBps", doc.get("bw_MBps"), n),
        lat_us=_square("lat_us", doc.get("lat_us"), n),
        size_bytes=int(doc.get("size_bytes", 0)), repeats=int(doc.get("repeats", 0)),
        backend=str(doc.get("backend", "?")), schedule=str(doc.get("schedule", "?")),
        started_wall_ns=doc.get("started_wall_ns"),
        bw_best_MBps=_best(doc.get("bw_samples_MBps"), n))


def healthy_level(cells: Sequence[float]) -> float:
    """The bandwidth a healthy cell has: the median of the upper half of ``cells``."""
    values = sorted(cells)
    return statistics.median(values[len(values) // 2:])


def row_labels(hosts: Sequence[str], ranks: Sequence[int]) -> list[str]:
    """Names for the rows/columns: the hosts, or ``host/rRANK`` when ranks share a host."""
    if len(set(hosts)) == len(hosts):
        return list(hosts)
    return [f"{h}/r{r}" for h, r in zip(hosts, ranks, strict=True)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def detect_probe_links(matrix: Matrix, hosts: Sequence[str], *, ratio: float = RATIO,
                      share: float = SHARE, reference_MBps: float | None = None,
                      lat_us: Matrix | None = None, ranks: Sequence[int] | None = None,
                      best: Matrix | None = None) -> tuple[Finding, ...]:
    """Slow links in a pairwise bandwidth matrix, read as C4 reads it.

    Args:
        matrix: ``[sender][receiver]`` bandwidth, MB/s; ``None`` where not measured.
        hosts: The host of each row/column.
        ratio: A cell is slow below ``ratio`` x the healthy level (default 0.5: noise of
            tens of percent never triggers).
        share: A row (column) is slow when more than this share of its measured cells are
            slow (default 0.5: most of them).
        reference_MBps: The healthy level to compare with (e.g. the line rate) instead of the
            one estimated from the matrix; needed when most cells may be slow (2 hosts).
        lat_us: The latency matrix, µs, quoted in the evidence.
        ranks: The rank of each row/column (default ``0..N-1``).
        best: The best sample of each cell, MB/s (:attr:`ProbeMatrix.bw_best_MBps`): when
            given, a cell is slow only if its best sample is below the threshold too.

    Returns:
        ``Finding(kind="slow_link")`` each, class ``sender side`` (a slow row: the host's
        egress), ``receiver side`` (a slow column: its ingress), ``sender and receiver side``
        (both), ``link`` (a cell, or two symmetric cells, no row or column explains) or
        ``link or either side (2 hosts)``; host-level findings first, slowest first.

    Raises:
        ValueError: ``matrix`` is not square over ``hosts``, or a threshold is out of range.
    """
    n = len(hosts)
    if any(m is not None and (len(m) != n or any(len(r) != n for r in m))
           for m in (matrix, best)):
        raise ValueError(f"bandwidth matrix is not {n} x {n}")
    if not 0 < ratio < 1 or not 0 <= share < 1:
        raise ValueError(f"ratio {ratio} and share {share}: expected 0 < ratio < 1, "
                         "0 <= share < 1")
    ranks = tuple(range(n)) if ranks is None else tuple(ranks)
    cells = {(i, j): float(v) for i, row in enumerate(matrix) for j, v in enumerate(row)
             if v is not None and i != j}
    if not cells:
        return ()
    ref = reference_MBps if reference_MBps is not None else healthy_level(list(cells.values()))
    threshold = ratio * ref
    slow = {c for c, v in cells.items() if v < threshold and
            (best is None or best[c[0]][c[1]] is None or best[c[0]][c[1]] < threshold)}
    if not slow:
        return ()
    healthy = [v for c, v in cells.items() if c not in slow]
    base = (f"{_fmt(statistics.median(healthy))} MB/s median of the {len(healthy)} healthy "
            f"cell(s)" if healthy else f"no healthy cell; reference {_fmt(ref)} MB/s")
    rule = f"slow: below {ratio:g} x {_fmt(ref)} = {_fmt(threshold)} MB/s" + (
        ", best sample too" if best is not None else "")
    ctx = _Ctx(cells, slow, tuple(hosts), row_labels(hosts, ranks), ranks, base, rule,
               threshold, lat_us)
    if len({h for c in cells for h in c}) == 2:
        return (ctx.two_hosts(),)

    def slow_lines(axis: int, others: set[int]) -> set[int]:
        # a line's cells that cross a slow line of the other axis are that line's evidence,
        # not this one's (a slow row makes one cell of every column slow)
        out = set()
        for k in range(n):
            line = [c for c in cells if c[axis] == k and c[1 - axis] not in others]
            if line and sum(c in slow for c in line) > share * len(line):
                out.add(k)
        return out

    rows0, cols0 = slow_lines(0, set()), slow_lines(1, set())
    rows, cols = slow_lines(0, cols0), slow_lines(1, rows0)
    host_level = []
    for k in sorted(rows | cols):
        cls = ("sender and receiver side" if k in rows and k in cols
               else "sender side" if k in rows else "receiver side")
        host_level.append(ctx.host(k, cls, k in rows, k in cols))
    explained = {c for c in slow if c[0] in rows or c[1] in cols}
    links, seen = [], set()
    for i, j in sorted(slow - explained):
        if (i, j) in seen:
            continue
        pair = [(i, j)] + ([(j, i)] if (j, i) in slow - explained else [])
        seen.update(pair)
        links.append(ctx.link(pair))
    key = lambda f_v: f_v[1]
    return tuple(f for f, _ in sorted(host_level, key=key)) + \
        tuple(f for f, _ in sorted(links, key=key))


@dataclass(frozen=True, slots=True)
class _Ctx:
    """What the findings of one matrix share."""

    cells: dict
    slow: set
    hosts: tuple[str, ...]
    labels: list[str]
    ranks: tuple[int, ...]
    base: str
    rule: str
    threshold: float
    lat_us: Matrix | None

    def _confidence(self, share: float, slow_cells: list) -> float:
        # how clearly below the threshold the slow cells sit (0 at it, 1 at zero bandwidth)
        margin = 1.0 - statistics.median(self.cells[c] for c in slow_cells) / self.threshold
        return round(max(0.0, min(1.0, share * (0.5 + 0.5 * margin))), 2)

    def _cells_text(self, line: list) -> str:
        h = self.labels
        return ", ".join(f"{h[i]}->{h[j]} {_fmt(self.cells[(i, j)])}"
                         + ("*" if (i, j) in self.slow else "") for i, j in line)

    def _lat_line(self, k: int) -> list[str]:
        lat = self.lat_us
        if lat is None:
            return []
        mine = [lat[a][b] for a, b in self.cells if k in (a, b) and lat[a][b] is not None]
        rest = [lat[a][b] for a, b in self.cells if k not in (a, b) and lat[a][b] is not None]
        if not mine:
            return []
        tail = f" vs {statistics.median(rest):.0f} µs elsewhere" if rest else ""
        return [f"latency (round trip / 2) with {self.labels[k]}: median "
                f"{statistics.median(mine):.0f} µs{tail}"]

    def host(self, k: int, cls: str, row: bool, col: bool) -> tuple[Finding, float]:
        h = self.labels
        out_line = sorted(c for c in self.cells if c[0] == k)
        in_line = sorted(c for c in self.cells if c[1] == k)
        ev = [f"row {h[k]} (sending): {sum(c in self.slow for c in out_line)} of "
              f"{len(out_line)} cells slow: {self._cells_text(out_line)} MB/s",
              f"column {h[k]} (receiving): {sum(c in self.slow for c in in_line)} of "
              f"{len(in_line)} cells slow: {self._cells_text(in_line)} MB/s",
              f"vs {self.base}; {self.rule} (*)"]
        what = {"sender side": f"what {h[k]} sends is slow, what it receives is not: its "
                "egress (NIC transmit, its uplink's outbound direction, its send path)",
                "receiver side": f"what {h[k]} receives is slow, what it sends is not: its "
                "ingress (NIC receive, the inbound direction of its link)",
                "sender and receiver side": f"{h[k]} is slow both ways: its NIC, cable or "
                "switch port"}[cls]
        ev.append(what)
        ev += self._lat_line(k)
        lines = ([out_line] if row else []) + ([in_line] if col else [])
        slow_cells = [c for line in lines for c in line if c in self.slow]
        share = len(slow_cells) / sum(len(line) for line in lines)
        f = Finding(kind="slow_link", cls=cls, ranks=(self.ranks[k],), hosts=(self.hosts[k],),
                    confidence=self._confidence(share, slow_cells), evidence=tuple(ev))
        return f, min(self.cells[c] for c in slow_cells)

    def _count(self, axis: int, k: int) -> str:
        line = [c for c in self.cells if c[axis] == k]
        return f"{sum(c in self.slow for c in line)} of {len(line)} cells"

    def _hosts(self, i: int, j: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.hosts[i], self.hosts[j])))

    def link(self, pair: list) -> tuple[Finding, float]:
        h = self.labels
        i, j = pair[0]
        both = len(pair) == 2
        ev = [f"{'cells' if both else 'cell'} {self._cells_text(pair)} MB/s vs {self.base}; "
              f"{self.rule}",
              f"row {h[i]} has {self._count(0, i)} slow, column {h[j]} {self._count(1, j)} slow: "
              f"neither host's side as a whole, the {h[i]}{'<->' if both else '->'}{h[j]} "
              "path" + (" (both directions)" if both else " (this direction only)")]
        f = Finding(kind="slow_link", cls="link", ranks=(self.ranks[i], self.ranks[j]),
                    hosts=self._hosts(i, j), confidence=self._confidence(1.0, pair),
                    evidence=tuple(ev))
        return f, min(self.cells[c] for c in pair)

    def two_hosts(self) -> Finding:
        h = self.labels
        (i, j), *_ = sorted(self.slow)
        ev = [f"{self._cells_text(sorted(self.cells))} MB/s vs {self.base}; {self.rule} (*)",
              f"with 2 hosts the {h[i]}->{h[j]} cell is at once {h[i]}'s whole row, {h[j]}'s "
              f"whole column and one link: the sender side of {h[i]}, the receiver side of "
              f"{h[j]} and the link cannot be told apart; probe again with a third host"]
        if len(self.slow) == 2:
            ev[1] = ("with 2 hosts both cells slow means one of the two hosts or the link "
                     "between them, slow both ways; probe again with a third host")
        ev += self._lat_line(i)
        f = Finding(kind="slow_link", cls="link or either side (2 hosts)",
                    ranks=(self.ranks[i], self.ranks[j]), hosts=self._hosts(i, j),
                    confidence=round(0.5 * self._confidence(1.0, sorted(self.slow)), 2),
                    evidence=tuple(ev))
        return f
