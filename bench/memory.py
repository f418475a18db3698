"""Peak memory of drydock's own processes while a command runs: the command's process
tree on the controller, plus what Ansible starts on the sandbox hosts through their
sshd (pg_dump, pg_restore, the modules). PostgreSQL's server processes are not counted:
they are the database's, and the runbook uses them the same way."""
from __future__ import annotations

import os
import threading

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


class PeakMemory:
    """Sample every 200 ms (a scan of /proc costs CPU the measured command would miss;
    the big processes, pg_dump and pg_restore, hold their size for seconds) until stop(): the peak of the summed resident memory of the
    process tree of `command` and of the sessions under `hosts` (the sandbox's sshd
    listeners, themselves not counted), and of the largest single process among them."""

    def __init__(self, command: int, hosts: set[int] = frozenset()):
        self.command = command
        self.hosts = set(hosts)
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
            sizes = [table[pid][1] * PAGE for pid in pids if pid in table]
            if sizes:
                self.peak_total = max(self.peak_total, sum(sizes))
                self.peak_process = max(self.peak_process, max(sizes))
            self._stop.wait(0.2)
