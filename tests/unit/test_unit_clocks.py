"""Clock offsets between hosts from the collectives' causality windows."""

from __future__ import annotations

import random

import polars as pl

from ringwatch.analyzers._clocks import align_clocks, compute_host_pairs, estimate_clock_offsets

from fakes import frame, row

US = 1_000


def job(offsets_us: dict[str, float], *, n=400, seed=0, slow_exit_host=None):
    """8 ranks, 2 per host; ``n`` world all-reduces, each member arriving 0-300 µs apart and
    leaving 20-60 µs after the last arrival (one in four is a big one that takes 5 ms). A
    host's clock reads true time minus its offset. With ``slow_exit_host``, that host's ranks
    leave up to 40 ms late (the far end of a throttled link)."""
    rng = random.Random(seed)
    rows = []
    for seq in range(1, n + 1):
        t0 = seq * 10_000 * US
        starts = {r: t0 + rng.uniform(0, 300) * US for r in range(8)}
        body = 5_000 * US if seq % 4 == 0 else 0
        last = max(starts.values()) + body
        for r in range(8):
            host = f"host{r // 2}"
            end = last + rng.uniform(20, 60) * US
            if host == slow_exit_host:
                end += rng.uniform(0, 40_000) * US
            skew = offsets_us[host] * US
            x = row(r, seq - 1, seq, pg_ranks="0-7", mono_start_ns=int(starts[r]),
                    mono_end_ns=int(end))
            x.update(host=host, t_start_ns=int(starts[r] - skew), t_end_ns=int(end - skew))
            rows.append(x)
    return frame(rows)


TRUE = {"host0": 0.0, "host1": 3_000.0, "host2": -7_000.0, "host3": 250.0}


def test_offsets_recovered_to_tens_of_microseconds():
    off = estimate_clock_offsets(job(TRUE))
    got = dict(off.select("host", "offset_ns").iter_rows())
    assert set(got) == set(TRUE)
    for h, want in TRUE.items():
        assert abs(got[h] / US - want) < 60, (h, got[h] / US, want)
    err = dict(off.select("host", "error_ns").iter_rows())
    assert err["host0"] == 0 and all(0 < err[h] < 120 * US for h in ("host1", "host2", "host3"))
    for h, want in TRUE.items():  # the truth is within the stated error
        assert abs(got[h] - want * US) <= err[h] + 1


def test_windows_agree_and_narrow_with_many_collectives():
    pairs = compute_host_pairs(job(TRUE))
    assert (pairs["low_ns"] <= pairs["high_ns"]).all()
    assert (pairs["high_ns"] - pairs["low_ns"]).max() < 200 * US
    few = compute_host_pairs(job(TRUE, n=8))
    assert (few["high_ns"] - few["low_ns"]).min() > (pairs["high_ns"] - pairs["low_ns"]).max()


def test_aligned_times_show_who_arrived_last():
    ev = job(TRUE)
    aligned = align_clocks(ev, estimate_clock_offsets(ev))
    # after alignment nobody leaves before the last member arrived (within the error)
    per = aligned.group_by("seq").agg(pl.col("t_start_ns").max().alias("last"),
                                      pl.col("t_end_ns").min().alias("first_out"))
    assert (per["first_out"] - per["last"]).min() > -60 * US
    raw = ev.group_by("seq").agg(pl.col("t_start_ns").max().alias("last"),
                                 pl.col("t_end_ns").min().alias("first_out"))
    assert (raw["first_out"] - raw["last"]).min() < -1_000 * US  # the skew hid it


def test_one_host_leaving_late_does_not_drag_the_estimate():
    off = estimate_clock_offsets(job(TRUE, slow_exit_host="host2"))
    got = dict(off.select("host", "offset_ns").iter_rows())
    for h, want in TRUE.items():
        assert abs(got[h] / US - want) < 100, (h, got[h] / US, want)


def test_the_reference_reads_zero_and_others_follow():
    off = estimate_clock_offsets(job(TRUE), reference="host2")
    got = dict(off.select("host", "offset_ns").iter_rows())
    assert got["host2"] == 0
    assert abs(got["host0"] / US - 7_000) < 60 and abs(got["host1"] / US - 10_000) < 60


def pipeline(offset_us: float, *, steps=40, seed=1):
    """Two stages on two hosts (ranks 0-1 on host0, 2-3 on host1), each stage's all-reduce
    inside its host: nothing but send/recv crosses. Per step, rank r sends an activation to
    r + 2 and gets a gradient back; a receive is posted 0-2 ms before its data arrives (or
    the send was issued up to 2 ms before the receive), and takes 100-300 µs to land.
    host1's clock reads true time minus ``offset_us``."""
    rng = random.Random(seed)
    rows, idx = [], {r: 0 for r in range(4)}

    def add(rank, op, peer, start, end, step):
        skew = offset_us * US if rank >= 2 else 0
        x = row(rank, idx[rank], None, op, is_p2p=True, peer=peer, step=step,
                pg_ranks="0-3", mono_start_ns=int(start), mono_end_ns=int(end))
        x.update(host=f"host{rank // 2}", t_start_ns=int(start - skew), t_end_ns=int(end - skew))
        rows.append(x)
        idx[rank] += 1

    for step in range(steps):
        t = step * 50_000 * US
        for src in range(4):
            dst = src + 2 if src < 2 else src - 2
            sent = t + (0 if src < 2 else 20_000 * US) + rng.uniform(0, 5_000) * US
            land = sent + rng.uniform(100, 300) * US
            posted = sent + rng.uniform(-2_000, 2_000) * US
            add(src, "send", dst, sent, sent + 50 * US, step)
            add(dst, "recv", src, posted, max(land, posted + 100 * US), step)
    return frame(rows)


def test_hosts_joined_only_by_send_recv_are_aligned_by_them():
    from ringwatch.analyzers._clocks import compute_p2p_pairs

    ev = pipeline(4_000)
    assert compute_host_pairs(ev).is_empty()  # no collective spans the hosts
    (pair,) = compute_p2p_pairs(ev).iter_rows(named=True)
    assert pair["collectives"] == 4 * 40 and pair["low_ns"] <= pair["high_ns"]
    off = dict(estimate_clock_offsets(ev).select("host", "offset_ns").iter_rows())
    # within the shortest transfers both ways (100-300 µs): the window they leave
    assert abs(off["host1"] / US - 4_000) < 300
    # aligned, no receive ends before its send was issued (on host1's raw clock, the
    # activations it receives land ~4 ms before they were sent)

    def landed_us(df):
        src = pl.when(pl.col("op") == "send").then(pl.col("rank")).otherwise(pl.col("peer"))
        df = df.with_columns(src.alias("src"), pl.col("op").cast(pl.Utf8))
        m = df.filter(pl.col("op") == "recv").join(
            df.filter(pl.col("op") == "send").select("step", "src", pl.col("t_start_ns")
                                                     .alias("sent")), on=["step", "src"])
        return ((m["t_end_ns"] - m["sent"]) / US).min()

    assert landed_us(ev) < -3_000
    assert landed_us(align_clocks(ev, estimate_clock_offsets(ev))) > -200


def test_messages_one_way_only_give_no_window():
    from ringwatch.analyzers._clocks import compute_p2p_pairs

    ev = pipeline(4_000).filter(~((pl.col("rank") >= 2) & (pl.col("op") == "send"))
                                & ~((pl.col("rank") < 2) & (pl.col("op") == "recv")))
    assert compute_p2p_pairs(ev).is_empty()
