"""A stand-in for a serving engine's communicator (vLLM's ``GroupCoordinator``: ``ranks``,
``rank_in_group``, ``unique_name``, ``all_reduce(input_)``, ``all_gather(input_, dim)``,
``send(tensor, dst)``, ``recv(tensor, src)``), attached with ``ringwatch.attach_communicator``.
Its all-reduce moves data over a socket pair of its own, not through torch.distributed, as a
custom all-reduce kernel does; torch.distributed only starts the job. Rank 1 is late by 20 ms
to every all-reduce from call 10 on. Writes what it issued to ``issued-<rank>.json``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist

import ringwatch


class StandInCoordinator:
    """Two ranks exchanging tensors over TCP on loopback."""

    def __init__(self, rank: int, port: int):
        self.ranks, self.rank_in_group, self.world_size = [0, 1], rank, 2
        self.unique_name = "tp:0"
        if rank == 0:
            srv = socket.create_server(("127.0.0.1", port))
            self.sock, _ = srv.accept()
            srv.close()
        else:
            for _ in range(100):
                try:
                    self.sock = socket.create_connection(("127.0.0.1", port))
                    break
                except OSError:
                    time.sleep(0.05)

    def _swap(self, t: torch.Tensor) -> torch.Tensor:
        data = t.contiguous().numpy().tobytes()
        self.sock.sendall(data)
        got = b""
        while len(got) < len(data):
            got += self.sock.recv(len(data) - len(got))
        return torch.frombuffer(bytearray(got), dtype=t.dtype).view_as(t)

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        return input_ + self._swap(input_)

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        other = self._swap(input_)
        parts = [input_, other] if self.rank_in_group == 0 else [other, input_]
        return torch.cat(parts, dim=dim)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.sock.sendall(tensor.contiguous().numpy().tobytes())

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        n = tensor.numel() * tensor.element_size()
        got = b""
        while len(got) < n:
            got += self.sock.recv(n - len(got))
        return torch.frombuffer(bytearray(got), dtype=tensor.dtype).view_as(tensor)

    def broken(self, input_: torch.Tensor) -> None:
        raise RuntimeError("the kernel failed")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--calls", type=int, default=40)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ringwatch.attach(log_dir=a.log_dir)
    comm = StandInCoordinator(rank, a.port)
    try:  # a method it cannot name an op for is refused before anything is wrapped
        ringwatch.attach_communicator(comm, methods=("all_reduce", "broken"))
        raise SystemExit("an unknown method was taken")
    except ValueError:
        assert not hasattr(comm.all_reduce, "__wrapped__")
    restore = ringwatch.attach_communicator(comm, name="tp", methods={
        "all_reduce": "all_reduce", "all_gather": "all_gather", "send": "send",
        "recv": "recv", "broken": "all_reduce"})
    issued = []
    x = torch.ones(256, dtype=torch.float32) * (rank + 1)
    for i in range(a.calls):
        ringwatch.mark_step(i)
        if rank == 1 and i >= 10:
            time.sleep(0.02)
        y = comm.all_reduce(x)
        assert float(y[0]) == 3.0
        issued.append("all_reduce")
        g = comm.all_gather(x[:64], dim=0)
        assert g.shape == (128,)
        issued.append("all_gather")
    if rank == 0:
        comm.send(x[:16], 1)
        issued.append("send")
    else:
        comm.recv(torch.empty(16), 0)
        issued.append("recv")
    try:
        comm.broken(x)
    except RuntimeError:
        issued.append("broken")
    restore()
    assert not hasattr(comm.all_reduce, "__wrapped__")
    comm.all_reduce(x)  # not recorded any more
    with open(os.path.join(a.log_dir, f"issued-{rank}.json"), "w") as f:
        json.dump(issued, f)
    ringwatch.detach()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
