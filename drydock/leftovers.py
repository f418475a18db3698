"""Stop what the tasks of a killed ansible-playbook left running, before its run ends.

A worker of ansible-playbook runs its task in a session of its own (ansible-core 2.19) and
ends that session's process group when ansible-playbook passes it a SIGTERM or SIGINT. After
a SIGKILL of ansible-playbook nothing is passed: the task's module, and the script or
notebook kernel it started, go on unattended, while drydock reports the failure and releases
the target's lock. A migration step's notebook then wrote into the local database for
seconds after `inv migrate` had returned, and would have written into a snapshot restored
meanwhile. callback_plugins/drydock_workers records the workers (PID and start); every
process still in one of their sessions is the work of this run's tasks.

Processes a task detached on purpose start a session of their own (setsid, a daemon's fork,
systemd) and are left alone: the app a start command launched, a snapshot's background copy,
SSH's shared connections."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from drydock.lock import stat_fields

TERM_WAIT_S = 30  # a module interrupted cleans up (drops its side database, its archive) before it exits
KILL_WAIT_S = 5


def _start(fields: list[str]) -> str:
    return fields[19]  # /proc/<pid>/stat's 22nd field: start, in clock ticks since boot


def recorded_workers(path: Path) -> list[tuple[int, str]]:
    """(PID, start) of each process the run's ansible-playbook forked."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return []
    workers = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            workers.append((int(parts[0]), parts[1]))
    return workers


def left_running(workers: list[tuple[int, str]]) -> dict[int, str]:
    """PID -> start of every live process in a recorded worker's session, and of their
    children's children: a notebook's kernel has a session of its own, but is its runner's
    child. A worker's PID given to a new process means its session is gone (the kernel
    reuses no PID that still names a session): that PID is skipped."""
    ours = set()
    for pid, start in workers:
        fields = stat_fields(pid)
        if fields is None or _start(fields) == start:
            ours.add(pid)
    table = {}  # pid -> (ppid, session, start) of every live process
    for entry in Path("/proc").iterdir():
        fields = stat_fields(entry.name) if entry.name.isdigit() else None
        if fields and fields[0] != "Z":  # state, ppid, pgrp, session, ...: a zombie has ended already
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), _start(fields))
    found = {pid: start for pid, (_, session, start) in table.items() if session in ours and pid != os.getpid()}
    while True:
        children = {pid: start for pid, (ppid, _, start) in table.items() if ppid in found and pid not in found}
        if not children:
            return found
        found.update(children)


def _still_running(processes: dict[int, str]) -> dict[int, str]:
    running = {}
    for pid, start in processes.items():
        fields = stat_fields(pid)
        if fields and fields[0] != "Z" and _start(fields) == start:
            running[pid] = start
    return running


def _signal(processes: dict[int, str], signum: int) -> dict[int, str]:
    """Signal those still running; returns the ones signalled (a process of become's user is
    out of a controller's reach that is not root: not waited for)."""
    signalled = {}
    for pid, start in _still_running(processes).items():
        try:
            os.kill(pid, signum)
            signalled[pid] = start
        except (ProcessLookupError, PermissionError):
            pass
    return signalled


def _wait(processes: dict[int, str], seconds: float) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    while (running := _still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def stop_left_running(workers_file: Path, say: Callable[[str], None]) -> int:
    """SIGTERM every process the run's tasks left running, SIGKILL those still there after
    TERM_WAIT_S, and return once they are gone (or KILL_WAIT_S later). Returns how many there
    were."""
    processes = left_running(recorded_workers(workers_file))
    if not processes:
        return 0
    say(f"==> stopping the {len(processes)} process(es) of the task ansible-playbook left running"
        f" (PIDs {', '.join(map(str, sorted(processes)))}) before the lock is released")
    remaining = _wait(_signal(processes, signal.SIGTERM), TERM_WAIT_S)
    if remaining:
        remaining = _wait(_signal(remaining, signal.SIGKILL), KILL_WAIT_S)
    remaining = _still_running(processes)  # with those this user may not signal
    if remaining:
        say(f"==> still running (another user's, or not stopping): PIDs {', '.join(map(str, sorted(remaining)))}")
    return len(processes)
