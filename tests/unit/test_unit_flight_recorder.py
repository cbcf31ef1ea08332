"""Flight Recorder dumps: parsing entries and loading files."""

from __future__ import annotations

import json
import pickle

import pytest

from ringwatch._flight_recorder import (
    load_dump,
    op_family,
    op_from_profiling_name,
    parse_entries,
)

from fakes import dump, fr_entry


def test_sizes_become_bytes_and_elements():
    (e,) = parse_entries(dump([fr_entry(0, 1, sizes=[(2, 3)], out_sizes=[(4, 2, 3)])]))
    assert e.numel_in == 6
    assert e.nbytes_in == 24
    assert e.nbytes_out == 96
    assert e.dtype == "float32"


def test_several_tensors_with_their_own_dtypes():
    raw = fr_entry(0, 1, sizes=[(10,), (3, 3)])
    raw["input_dtypes"] = ["Half", "Long"]
    raw["output_sizes"] = [[5]]
    raw["output_dtypes"] = ["BFloat16"]
    (e,) = parse_entries(dump([raw]))
    assert e.nbytes_in == 10 * 2 + 9 * 8
    assert e.numel_in == 19
    assert e.nbytes_out == 5 * 2
    assert e.dtype == "float16"  # first input tensor's


@pytest.mark.parametrize(("fr_dtype", "name", "size"), [
    ("Float", "float32", 4), ("Double", "float64", 8), ("Half", "float16", 2),
    ("BFloat16", "bfloat16", 2), ("Long", "int64", 8), ("Int", "int32", 4),
    ("Char", "int8", 1), ("Byte", "uint8", 1), ("Bool", "bool", 1),
    ("ComplexFloat", "complex64", 8), ("Float8_e4m3fn", "float8_e4m3fn", 1),
])
def test_dtype_mapping(fr_dtype, name, size):
    (e,) = parse_entries(dump([fr_entry(0, 1, sizes=[(7,)], dtype=fr_dtype)]))
    assert e.dtype == name
    assert e.nbytes_in == 7 * size


def test_unknown_dtype_counts_elements_but_no_bytes():
    (e,) = parse_entries(dump([fr_entry(0, 1, sizes=[(7,)], dtype="SomeNewType")]))
    assert e.dtype is None and e.numel_in == 7 and e.nbytes_in == 0


def test_missing_output_dtypes_fall_back_to_the_inputs():
    raw = fr_entry(0, 1, sizes=[(4,)], dtype="Double", out_sizes=[(8,)])
    del raw["output_dtypes"]
    (e,) = parse_entries(dump([raw]))
    assert e.nbytes_out == 64


def test_empty_and_scalar_shapes():
    barrier = fr_entry(0, 1, "gloo:barrier", sizes=[])
    barrier["input_dtypes"] = barrier["output_dtypes"] = []
    scalar = fr_entry(1, 2, sizes=[()])
    b, s = parse_entries(dump([barrier, scalar]))
    assert (b.nbytes_in, b.nbytes_out, b.numel_in, b.dtype) == (0, 0, 0, None)
    assert (s.numel_in, s.nbytes_in) == (1, 4)


@pytest.mark.parametrize(("profiling_name", "op"), [
    ("gloo:all_reduce", "all_reduce"),
    ("nccl:all_reduce", "all_reduce"),
    ("nccl:_all_gather_base", "all_gather_into_tensor"),
    ("nccl:_reduce_scatter_base", "reduce_scatter_tensor"),
    ("gloo:broadcast", "broadcast"),
    ("nccl:coalesced", "coalesced"),
    ("nccl:all_to_all", "all_to_all"),
    ("gloo:all_reduce_barrier", "barrier"),
    ("nccl:allreduce_coalesced", "all_reduce_coalesced"),
    ("nccl:something_new", "unknown"),
    ("", "unknown"),
    ("all_gather", "all_gather"),
])
def test_op_names(profiling_name, op):
    assert op_from_profiling_name(profiling_name) == op
    (e,) = parse_entries(dump([fr_entry(0, 1, profiling_name)]))
    assert e.op == op and e.profiling_name == profiling_name


@pytest.mark.parametrize(("profiling_name", "op"), [
    ("nccl:send 0->1", "send"),
    ("nccl:recv 1<-0", "recv"),
    ("gloo:send", "send"),
])
def test_p2p_profiling_names_with_peers(profiling_name, op):
    # ProcessGroupNCCL names its point-to-point entries "nccl:send <me>-><peer>" and
    # "nccl:recv <me><-<peer>".
    assert op_from_profiling_name(profiling_name) == op


def test_op_family():
    assert op_family("all_reduce_coalesced") == "all_reduce"
    assert op_family("all_gather_into_tensor") == "all_gather"
    assert op_family("reduce_scatter_tensor") == "reduce_scatter"
    assert op_family("all_to_all_single") == "all_to_all"
    assert op_family("broadcast") == "broadcast"


def test_entries_sorted_by_record_id_and_fields_mapped():
    e2 = fr_entry(2, 3, "nccl:all_reduce", pg="1", desc="tp", state="started")
    e0 = fr_entry(0, 1, "nccl:broadcast")
    e1 = fr_entry(1, 0, "nccl:send", is_p2p=True, p2p_seq=4)
    e0["time_discovered_started_ns"] = 1_700_000_000_000_000_500
    e0["time_discovered_completed_ns"] = 1_700_000_000_000_009_000
    e0["duration_ms"] = 1.25
    parsed = parse_entries(dump([e2, e0, e1]))
    assert [p.seq for p in parsed] == [1, 0, 3]
    first, p2p, last = parsed
    assert first.t_created_ns == 1_700_000_000_000_000_000
    assert first.t_started_ns == 1_700_000_000_000_000_500
    assert first.t_completed_ns == 1_700_000_000_000_009_000
    assert first.duration_ns == 1_250_000
    assert first.state == "completed" and first.retired is True
    assert first.pg == "0" and first.pg_desc == "default_pg" and first.op_id == 1
    assert p2p.is_p2p and p2p.p2p_seq == 4 and p2p.op == "send"
    assert last.pg == "1" and last.pg_desc == "tp" and last.state == "started"
    # Zero times mean "not recorded".
    assert last.t_started_ns is None and last.t_completed_ns is None and last.duration_ns is None


def test_empty_dump():
    assert parse_entries({}) == []
    assert parse_entries({"entries": None}) == []


def test_load_dump_json(tmp_path):
    d = dump([fr_entry(0, 1)])
    path = tmp_path / "fr.json"
    path.write_text(json.dumps(d))
    assert load_dump(path) == d
    assert load_dump(str(path)) == d


def test_load_dump_pickle(tmp_path):
    d = dump([fr_entry(0, 1, "nccl:all_reduce")])
    path = tmp_path / "rank_0"
    path.write_bytes(pickle.dumps(d))
    loaded = load_dump(path)
    assert loaded == d
    assert parse_entries(loaded)[0].op == "all_reduce"


def test_load_dump_garbage_raises_value_error(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\x00\x01 definitely not a dump \xff")
    with pytest.raises(ValueError, match="not a Flight Recorder dump"):
        load_dump(path)


class _Planted:
    """What a malicious pickle does: on load, call a function of its choosing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_planted_pickle_runs_no_code(tmp_path, wrapped):
    marker = tmp_path / "marker"
    payload = _Planted(marker)
    obj = {"version": "2.10", "entries": [payload]} if wrapped else payload
    path = tmp_path / "flight_recorder.json"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match="refused: the pickle names"):
        load_dump(path)
    assert not marker.exists()
    assert pickle.loads(path.read_bytes()) is not None and marker.exists()  # it was live


def test_a_dump_pytorch_pickled_loads(tmp_path):
    """A real dump: the generic Flight Recorder of a one-rank Gloo group, as PyTorch pickles it
    (in a child process: no process group is left in this one)."""
    import subprocess
    import sys

    out = tmp_path / "rank_0"
    code = f"""
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
store = dist.HashStore()
dist.init_process_group("gloo", rank=0, world_size=1, store=store)
t = torch.ones(4)
for _ in range(3):
    dist.all_reduce(t)
open({str(out)!r}, "wb").write(torch._C._distributed_c10d._dump_fr_trace(True, False))
dist.destroy_process_group()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    dump = load_dump(out)
    entries = parse_entries(dump)
    assert [(e.op, e.seq, e.nbytes_in) for e in entries] == [("all_reduce", i, 16)
                                                             for i in (1, 2, 3)]


def test_typed_lists_of_older_pytorch_pickles_load_as_lists():
    from ringwatch._flight_recorder import loads_plain_pickle

    # GLOBAL torch.jit._pickle build_intlist, applied to ([1, 2, 3],)
    data = (b"\x80\x02ctorch.jit._pickle\nbuild_intlist\nq\x00]q\x01(K\x01K\x02K\x03e"
            b"\x85q\x02Rq\x03.")
    assert loads_plain_pickle(data) == [1, 2, 3]
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        loads_plain_pickle(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02R"
                           b"q\x03.")


def test_a_dump_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "fr.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="not a mapping"):
        load_dump(path)
    big = tmp_path / "big"
    big.write_bytes(b"{}" + b" " * 100)
    with pytest.raises(ValueError, match="over the 10 read"):
        load_dump(big, max_bytes=10)
