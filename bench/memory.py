"""Peak memory of drydock's own processes while a command runs: the command's process
tree on the controller, the SSH connection masters Ansible keeps open to the sandbox's
hosts (ControlPersist: they leave the command's tree), plus what Ansible starts on the
hosts through their sshd (pg_dump, pg_restore, the modules). PostgreSQL's server
processes are not counted: they are the database's, and the runbook uses them the same way."""
from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

from drydock.sandbox import processes

PAGE = os.sysconf("SC_PAGE_SIZE")


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    found = set(roots) & set(table)
    grew = True
    while grew:
        grew = False
        for pid, (parent, _rss) in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def tcp_peers(table: Path = Path("/proc/net/tcp")) -> dict[int, str]:
    """The remote IPv4 address of each TCP socket, by its inode."""
    peers = {}
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        remote = int(fields[2].split(":")[0], 16)  # the address's bytes, read as a native integer
        peers[int(fields[9])] = socket.inet_ntoa(struct.pack("=I", remote))
    return peers


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:  # it ended meanwhile
        pass
    return inodes


def ssh_masters(pids: set[int], addresses: set[str]) -> set[int]:
    """Those of `pids` that are SSH connection masters (OpenSSH names one `ssh: <control
    path> [mux]`) connected to one of `addresses`: another sandbox's, or a user's own, are not
    this command's."""
    masters = set()
    peers = None
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        title = name.split(b"\0", 1)[0]
        if not (title.startswith(b"ssh: ") and title.endswith(b" [mux]")):
            continue
        peers = tcp_peers() if peers is None else peers
        if any(peers.get(inode) in addresses for inode in socket_inodes(pid)):
            masters.add(pid)
    return masters


class PeakMemory:
    """Sample every 200 ms (a scan of /proc costs CPU the measured command would miss;
    the big processes, pg_dump and pg_restore, hold their size for seconds) until stop(): the peak of the summed resident memory of the
    process tree of `command`, of the SSH masters connected to `addresses` and of the sessions
    under `hosts` (the sandbox's sshd listeners, themselves not counted), and of the largest
    single process among them."""

    def __init__(self, command: int, hosts: set[int] = frozenset(), addresses: set[str] = frozenset()):
        self.command = command
        self.hosts = set(hosts)
        self.addresses = set(addresses)
        self.peak_total = 0
        self.peak_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            table = processes()
            pids = _descendants({self.command}, table) | (_descendants(self.hosts, table) - self.hosts)
            if self.addresses:  # a master detaches: init is its parent, as of a few daemons
                pids |= ssh_masters({pid for pid, (parent, _rss) in table.items() if parent == 1}, self.addresses)
            sizes = [table[pid][1] * PAGE for pid in pids if pid in table]
            if sizes:
                self.peak_total = max(self.peak_total, sum(sizes))
                self.peak_process = max(self.peak_process, max(sizes))
            self._stop.wait(0.2)
