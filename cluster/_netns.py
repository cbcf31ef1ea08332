"""Emulated hosts: one network namespace per host, joined by a Linux bridge through veth pairs.

For host ``i`` of run ``<id>``: namespace ``<id>h<ii>``, its end of the veth pair is ``eth0``
inside the namespace with address ``<subnet>.<i+1>/24``; the other end, ``<id>h<ii>`` in the
root namespace, is a port of the bridge ``<id>b``. Ranks of a host run inside its namespace with
``GLOO_SOCKET_IFNAME=eth0``; ranks of one host talk to each other inside their namespace, so only
traffic between hosts crosses the veth pairs, where the link faults act.

Everything is created through ``ip`` (iproute2), ``tc`` and ``nft``; every command that fails
raises :class:`NetError` with the command and its message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from ringwatch.cluster._owner import ID_RE

IFNAME = "eth0"


class NetError(RuntimeError):
    """A network set-up command failed."""


def _run(*cmd: str, check: bool = True) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise NetError(f"{cmd[0]} not found (install iproute2 / nftables)") from exc
    if check and p.returncode != 0:
        raise NetError(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def netns_unavailable_reason() -> str | None:
    """Why emulated hosts cannot be made here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not found"
    return None


@dataclass(frozen=True, slots=True)
class Host:
    """One emulated host."""

    index: int
    netns: str | None  # None on loopback
    addr: str
    ifname: str
    veth: str | None  # the root-side end of its veth pair

    @property
    def name(self) -> str:
        return f"host{self.index}"

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return cmd if self.netns is None else ["ip", "netns", "exec", self.netns, *cmd]

    def run(self, *cmd: str, check: bool = True) -> str:
        return _run(*self.wrap(list(cmd)), check=check)


def loopback_hosts(count: int) -> list[Host]:
    """Hosts as labels only: every rank on 127.0.0.1."""
    return [Host(i, None, "127.0.0.1", "lo", None) for i in range(count)]


class Network:
    """The namespaces, veth pairs and bridge of one run; :meth:`teardown` removes them all."""

    def __init__(self, run_id: str, count: int, subnet: str = "10.77.0"):
        self.run_id, self.count, self.subnet = run_id, count, subnet
        self.bridge = f"{run_id}b"
        self.hosts: list[Host] = []

    def create(self) -> list[Host]:
        """Create the bridge and one namespace per host; returns the hosts."""
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.count):
            ns = veth = f"{self.run_id}h{i:02x}"
            peer = f"{self.run_id}p{i:02x}"
            _run("ip", "netns", "add", ns)
            host = Host(i, ns, f"{self.subnet}.{i + 1}", IFNAME, veth)
            self.hosts.append(host)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "-n", ns, "link", "set", peer, "name", IFNAME)
            _run("ip", "-n", ns, "addr", "add", f"{host.addr}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
        return list(self.hosts)

    def teardown(self) -> list[str]:
        """Remove namespaces, veth pairs and the bridge; returns what could not be removed."""
        return remove_run_objects(self.run_id)


def list_netns() -> list[str]:
    out = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[str]:
    out = _run("ip", "-o", "link", "show", check=False)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def run_ids_in_network() -> set[str]:
    """Run ids named by any namespace or link on this machine."""
    if shutil.which("ip") is None:
        return set()
    return {m.group(1) for n in list_netns() + list_links() if (m := ID_RE.match(n))}


def remove_run_objects(run_id: str) -> list[str]:
    """Delete every namespace and link of ``run_id``, ending the processes inside first."""
    from ringwatch.cluster._procs import end_processes

    left = []
    if shutil.which("ip") is None:
        return left
    for ns in [n for n in list_netns() if n.startswith(run_id)]:
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).split()]
        end_processes(pids, grace_s=2.0)
        try:
            _run("ip", "netns", "del", ns)
        except NetError as exc:
            left.append(str(exc))
    for link in [n for n in list_links() if n.startswith(run_id)]:
        try:
            _run("ip", "link", "del", link)
        except NetError as exc:
            if link in list_links():  # deleting one end of a veth pair removes the other
                left.append(str(exc))
    return left
