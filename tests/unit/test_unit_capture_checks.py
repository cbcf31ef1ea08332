"""Capture checks on small synthetic frames: rank consistency and the Flight Recorder."""

from __future__ import annotations

from ringwatch.analyzers import (
    check_consistency,
    compare_flight_recorder,
    compute_collective_signatures,
)

from fakes import dump, fr_entry, frame, row, uniform

# ---- check_consistency --------------------------------------------------------------------------


def test_consistent_job_is_ok():
    rep = check_consistency(frame(uniform(ranks=(0, 1, 2), seqs=(1, 2, 3, 4), pg_ranks="0-2")))
    assert rep.ok, rep.problems
    assert rep.problems == () and rep.n_problems == 0
    (g,) = rep.groups
    assert g.pg == "0" and g.ranks == (0, 1, 2) and g.collectives == 4 and g.p2p == 0


def test_several_groups_checked_separately():
    rows = uniform(seqs=(1, 2))
    rows += [row(0, 10, 1, pg="1", pg_ranks="0,2"), row(2, 0, 1, pg="1", pg_ranks="0,2")]
    rows += [row(2, 1, 1, pg="0", pg_ranks="0-1")]  # rank 2 is not even a member: still fine
    rep = check_consistency(frame([r for r in rows if not (r["rank"] == 2 and r["pg"] == "0")]))
    assert rep.ok, rep.problems
    assert {g.pg: g.ranks for g in rep.groups} == {"0": (0, 1), "1": (0, 2)}


def test_rank_missing_a_number():
    rows = [r for r in uniform() if not (r["rank"] == 1 and r["seq"] == 3)]
    rep = check_consistency(frame(rows))
    assert not rep.ok
    assert any("seq 3" in p and "[1]" in p and "did not record" in p for p in rep.problems)


def test_truncated_rank_is_tolerated_up_to_the_common_number():
    rows = [r for r in uniform(seqs=(1, 2, 3, 4)) if not (r["rank"] == 1 and r["seq"] >= 3)]
    assert not check_consistency(frame(rows)).ok
    rep = check_consistency(frame(rows), upto_common=True)
    assert rep.ok, rep.problems
    assert rep.groups[0].collectives == 2


def test_upto_common_still_catches_disagreements_before_the_cut():
    rows = [r for r in uniform(seqs=(1, 2, 3)) if not (r["rank"] == 1 and r["seq"] == 3)]
    rows[1] = row(0, 1, 2, nbytes=800)
    rep = check_consistency(frame(rows), upto_common=True)
    assert not rep.ok
    assert any("seq 2" in p and "disagree" in p for p in rep.problems)


def test_members_disagree_on_bytes():
    rows = uniform()
    rows[4] = row(1, 1, 2, nbytes=800)
    rep = check_consistency(frame(rows))
    assert not rep.ok
    (p,) = rep.problems
    assert "seq 2" in p and "disagree" in p and "800" in p and "400" in p


def test_members_disagree_on_op():
    rows = uniform()
    rows[0] = row(0, 0, 1, "broadcast")
    rep = check_consistency(frame(rows))
    assert not rep.ok
    assert any("seq 1" in p and "broadcast" in p for p in rep.problems)


def test_numbers_out_of_issue_order():
    rows = [row(0, 0, 1), row(0, 1, 3), row(0, 2, 2), row(1, 0, 1), row(1, 1, 2), row(1, 2, 3)]
    rep = check_consistency(frame(rows))
    assert not rep.ok
    assert any("rank 0" in p and "out of issue order" in p for p in rep.problems)


def test_a_hole_in_the_numbering():
    rep = check_consistency(frame(uniform(seqs=(1, 2, 4, 5))))
    assert not rep.ok
    assert [p for p in rep.problems if "missing numbers [3]" in p] != []
    assert rep.n_problems == 2  # one line per rank


def test_send_without_recv():
    rows = uniform(seqs=(1,))
    rows += [row(0, 5, 1, "send", is_p2p=True, peer=1, nbytes=64)]
    rep = check_consistency(frame(rows))
    assert not rep.ok
    assert rep.problems == ("pg 0 0->1 #1: send without a matching recv",)


def test_recv_without_send_and_size_mismatch():
    rows = [row(1, 0, 1, "recv", is_p2p=True, peer=0, nbytes=64),
            row(0, 0, 2, "send", is_p2p=True, peer=1, nbytes=64),
            row(1, 1, 2, "recv", is_p2p=True, peer=0, nbytes=32)]
    rep = check_consistency(frame(rows))
    assert not rep.ok
    assert "pg 0 0->1 #1: recv without a matching send" in rep.problems
    assert "pg 0 0->1 #2: send 64 B, recv 32 B" in rep.problems


def test_matched_send_recv_pairs_are_ok():
    rows = uniform(seqs=(1,))
    rows += [row(0, 5, 1, "send", is_p2p=True, peer=1, nbytes=64),
             row(1, 5, 1, "recv", is_p2p=True, peer=0, nbytes=64),
             row(1, 6, 1, "send", is_p2p=True, peer=0, nbytes=8),
             row(0, 6, 1, "recv", is_p2p=True, peer=1, nbytes=8)]
    rep = check_consistency(frame(rows))
    assert rep.ok, rep.problems
    assert rep.groups[0].p2p == 4


def test_gather_root_and_non_root_bytes_accepted():
    # Root (rank 0) receives 2 x 400 B, non-root only sends its 400 B.
    rows = [row(0, 0, 1, "gather", nbytes_in=400, nbytes_out=800, root=0),
            row(1, 0, 1, "gather", nbytes_in=400, nbytes_out=0, root=0)]
    assert check_consistency(frame(rows)).ok
    rows[1] = row(1, 0, 1, "gather", nbytes_in=200, nbytes_out=0, root=0)
    assert not check_consistency(frame(rows)).ok


def test_scatter_compares_output_bytes_and_all_to_all_nothing():
    rows = [row(0, 0, 1, "scatter", nbytes_in=800, nbytes_out=400, root=0),
            row(1, 0, 1, "scatter", nbytes_in=0, nbytes_out=400, root=0),
            row(0, 1, 2, "all_to_all_single", nbytes=100),
            row(1, 1, 2, "all_to_all_single", nbytes=300)]
    rep = check_consistency(frame(rows))
    assert rep.ok, rep.problems


def test_coalesced_batch_signature_joins_its_ops():
    rows = [row(0, 0, 1, nbytes=100), row(0, 1, 1, nbytes=200),
            row(1, 0, 1, nbytes=100), row(1, 1, 1, nbytes=200)]
    sig = compute_collective_signatures(frame(rows))
    assert sig["signature"].to_list() == ["all_reduce:100+all_reduce:200"] * 2
    assert check_consistency(frame(rows)).ok
    rows[3] = row(1, 1, 1, nbytes=100)
    assert not check_consistency(frame(rows)).ok


def test_member_that_recorded_nothing():
    rows = uniform(ranks=(0, 1), seqs=(1, 2), pg_ranks="0-2")
    rep = check_consistency(frame(rows))
    assert not rep.ok
    assert any("[2]" in p and "recorded none" in p for p in rep.problems)


def test_problems_are_capped_but_counted():
    rows = [row(0, i, i + 1) for i in range(20)] + [row(1, i, i + 1, nbytes=8) for i in range(20)]
    rep = check_consistency(frame(rows), max_problems=5)
    assert len(rep.problems) == 5 and rep.n_problems == 20


def test_failed_collective_without_a_number_does_not_break_the_check():
    # A collective whose call raised before it was numbered has a null `seq` (the schema
    # allows it). The check must still run and report on the rest.
    rows = uniform(seqs=(1, 2))
    rows.append(row(0, 2, None, "monitored_barrier", nbytes=None, status="timeout"))
    rep = check_consistency(frame(rows))
    assert isinstance(rep.ok, bool)
    assert not any("seq 1" in p or "seq 2" in p for p in rep.problems)


# ---- compare_flight_recorder --------------------------------------------------------------------


def rank0(seqs=(1, 2, 3), pg="0", start_idx=0, **kw):
    return [row(0, start_idx + i, s, pg=pg, **kw) for i, s in enumerate(seqs)]


def test_fr_matching_case():
    ev = frame(rank0())
    fr = dump([fr_entry(i, s) for i, s in enumerate((1, 2, 3))])
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok and cmp.order_ok
    assert cmp.matched == 3 and cmp.fr_only == () and cmp.ringwatch_only == ()
    assert cmp.mismatches == () and cmp.fr_p2p == 0


def test_fr_entry_missed_by_ringwatch():
    ev = frame(rank0(seqs=(1, 3)))
    fr = dump([fr_entry(i, s) for i, s in enumerate((1, 2, 3))])
    cmp = compare_flight_recorder(ev, fr)
    assert not cmp.ok
    assert cmp.fr_only == (("0", 2),) and cmp.matched == 2


def test_extra_ringwatch_row():
    ev = frame(rank0(seqs=(1, 2, 3, 4)))
    fr = dump([fr_entry(i, s) for i, s in enumerate((1, 2, 3))])
    cmp = compare_flight_recorder(ev, fr)
    assert not cmp.ok
    assert cmp.ringwatch_only == (("0", 4),)


def test_order_difference_across_groups():
    ev = frame([row(0, 0, 1, pg="0"), row(0, 1, 2, pg="0"), row(0, 2, 1, pg="1")])
    fr = dump([fr_entry(0, 1, pg="0"), fr_entry(1, 1, pg="1"), fr_entry(2, 2, pg="0")])
    cmp = compare_flight_recorder(ev, fr)
    assert not cmp.ok and not cmp.order_ok
    assert cmp.matched == 3 and cmp.fr_only == () and cmp.ringwatch_only == ()


def test_rows_recovered_from_the_recorder_do_not_count_in_the_order():
    """Recovered rows are numbered when recovered, after later collectives of other groups."""
    late = {**row(0, 2, 1, pg="1"), "api": "flight_recorder", "status": "unknown"}
    ev = frame([row(0, 0, 1, pg="0"), row(0, 1, 2, pg="0"), late])
    fr = dump([fr_entry(0, 1, pg="0"), fr_entry(1, 1, pg="1"), fr_entry(2, 2, pg="0")])
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok and cmp.order_ok and cmp.matched == 3


def test_op_and_byte_mismatches():
    ev = frame(rank0(seqs=(1, 2)))
    fr = dump([fr_entry(0, 1, "gloo:broadcast"), fr_entry(1, 2, sizes=[(50,)])])
    cmp = compare_flight_recorder(ev, fr)
    assert not cmp.ok
    assert len(cmp.mismatches) == 2
    assert "seq 1" in cmp.mismatches[0] and "broadcast" in cmp.mismatches[0]
    assert "seq 2" in cmp.mismatches[1] and "200" in cmp.mismatches[1]


def test_op_families_match_across_names():
    ev = frame([row(0, 0, 1, "all_gather_into_tensor", nbytes_in=400, nbytes_out=800),
                row(0, 1, 2, "barrier", nbytes=None)])
    fr = dump([fr_entry(0, 1, "nccl:_all_gather_base", out_sizes=[(200,)]),
               fr_entry(1, 2, "nccl:all_reduce", sizes=[(1,)])])  # NCCL's barrier
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok, cmp


def test_nccl_coalesced_summary_entry_is_not_a_second_collective():
    ev = frame([row(0, 0, 1), row(0, 1, 2), row(0, 2, 2), row(0, 3, 3)])
    fr = dump([fr_entry(0, 1, "nccl:all_reduce"),
               fr_entry(1, 2, "nccl:all_reduce"), fr_entry(2, 2, "nccl:all_reduce"),
               fr_entry(3, 2, "nccl:coalesced", sizes=[(100,), (100,)]),
               fr_entry(4, 3, "nccl:all_reduce")])
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok, cmp
    assert cmp.matched == 3


def test_fr_ring_window_only_compares_its_last_entries():
    ev = frame(rank0(seqs=tuple(range(1, 11))))
    fr = dump([fr_entry(i, s) for i, s in enumerate(range(8, 11))])  # the ring kept 8..10
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok, cmp
    assert cmp.matched == 3 and cmp.ringwatch_only == ()


def test_fr_p2p_entries_are_counted_not_compared():
    ev = frame(rank0(seqs=(1,)) + [row(0, 5, 1, "send", is_p2p=True, peer=1, nbytes=64)])
    fr = dump([fr_entry(0, 1), fr_entry(1, 0, "nccl:send 0->1", is_p2p=True, p2p_seq=1)])
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok and cmp.fr_p2p == 1 and cmp.matched == 1


def test_groups_absent_from_the_fr_are_not_compared():
    ev = frame(rank0(seqs=(1, 2)) + rank0(seqs=(1, 2), pg="5", start_idx=10))
    fr = dump([fr_entry(0, 1), fr_entry(1, 2)])
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.ok and cmp.matched == 2


def test_fr_with_only_p2p_entries_compares_nothing():
    # A pipeline stage whose recorder window holds only send/recv: no collective to compare.
    ev = frame(rank0(seqs=(1, 2)))
    fr = dump([fr_entry(0, 0, "nccl:send 0->1", is_p2p=True, p2p_seq=1),
               fr_entry(1, 0, "nccl:recv 0<-1", is_p2p=True, p2p_seq=1)])
    cmp = compare_flight_recorder(ev, fr)
    assert cmp.matched == 0 and cmp.fr_only == () and cmp.fr_p2p == 2


def test_empty_fr_dump_compares_nothing():
    cmp = compare_flight_recorder(frame(rank0(seqs=(1,))), dump([]))
    assert cmp.matched == 0 and cmp.fr_only == () and cmp.mismatches == ()


def test_empty_frames():
    assert check_consistency(frame([])).ok
    cmp = compare_flight_recorder(frame([]), dump([fr_entry(0, 1)]))
    assert not cmp.ok and cmp.fr_only == (("0", 1),)
