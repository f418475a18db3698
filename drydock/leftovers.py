"""Stop what the unfinished tasks of an ansible-playbook run left running, before the run ends.

A worker of ansible-playbook runs its task in a session of its own (ansible-core 2.19) and
ends that session's process group when ansible-playbook passes it a SIGTERM or SIGINT. After
a SIGKILL of ansible-playbook nothing is passed: the task's module, and the script or
notebook kernel it started, go on unattended, while drydock reports the failure and releases
the target's lock. A migration step's notebook then wrote into the local database for
seconds after `inv migrate` had returned, and would have written into a snapshot restored
meanwhile. callback_plugins/drydock_workers records the workers (PID and start) and those
that finished their task; every process still in the session of one that did not, and their
children, is the work of this run's unfinished tasks.

Left alone: what a finished task left in its session (an app a start command put in the
background), and what a task detached on purpose in a session of its own once its parent
has gone (a daemon, a snapshot's background copy, SSH's shared connections)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from drydock.lock import stat_fields

# A module interrupted cleans up (lets connections in again, drops what it made) before it
# exits: seconds. Waited for that long before SIGKILL.
TERM_WAIT_S = 60
KILL_WAIT_S = 5
SCAN_EVERY_S = 0.1


def _start(fields: list[str]) -> str:
    return fields[19]  # /proc/<pid>/stat's 22nd field: start, in clock ticks since boot


def unfinished_workers(path: Path) -> list[tuple[int, str]]:
    """(PID, start) of each worker the run's ansible-playbook started that did not finish its task."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return []
    started, done = [], set()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            if parts[2:] == ["done"]:
                done.add((int(parts[0]), parts[1]))
            elif not parts[2:]:
                started.append((int(parts[0]), parts[1]))
    return [worker for worker in started if worker not in done]


def _is_this_runs(pid: int, marker: bytes) -> bool:
    """The process carries this run's DRYDOCK_WORKERS_FILE in its environment (unreadable: no)."""
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def left_running(workers: list[tuple[int, str]], workers_file: Path) -> dict[int, str]:
    """PID -> start of every live process in an unfinished worker's session, and of their
    children's children (a notebook's kernel has a session of its own, but is its runner's
    child). A worker still running is checked by its start; the session of one that has
    ended may, after the PIDs wrapped around, be another program's under the same number:
    its processes count only if they carry this run's environment."""
    live, ended = set(), set()
    for pid, start in workers:
        fields = stat_fields(pid)
        if fields is None or fields[0] == "Z":
            ended.add(pid)
        elif _start(fields) == start:
            live.add(pid)
    marker = f"DRYDOCK_WORKERS_FILE={workers_file}".encode()
    table = {}  # pid -> (ppid, session, start) of every live process
    for entry in Path("/proc").iterdir():
        fields = stat_fields(entry.name) if entry.name.isdigit() else None
        if fields and fields[0] != "Z":  # state, ppid, pgrp, session, ...: a zombie has ended already
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), _start(fields))
    found = {pid: start for pid, (_, session, start) in table.items()
             if pid != os.getpid() and (session in live or (session in ended and _is_this_runs(pid, marker)))}
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


def _send(processes: dict[int, str], signum: int) -> None:
    for pid in _still_running(processes):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):  # ended meanwhile; become's user, out of a non-root reach
            pass


def stop_left_running(workers_file: Path, say: Callable[[str], None]) -> int:
    """SIGTERM every process the run's unfinished tasks left running, and any they start
    meanwhile; SIGKILL those still there TERM_WAIT_S later; return once all are gone (or
    KILL_WAIT_S after that). Those this user may not signal (become's, for a controller that
    is not root) are waited for all the same. A second Ctrl-C does not cut it short, and a
    failure to read /proc ends it with a line, never a traceback. Returns how many there were."""
    workers = unfinished_workers(workers_file)
    if not workers:
        return 0
    seen: dict[int, str] = {}
    term_deadline = time.monotonic() + TERM_WAIT_S
    kill_deadline = None
    while True:
        try:
            new = {pid: start for pid, start in left_running(workers, workers_file).items() if pid not in seen}
            if new and not seen:
                say(f"==> waiting for the {len(new)} process(es) of the task that did not finish to stop"
                    f" (PIDs {', '.join(map(str, sorted(new)))}) before the lock is released")
            seen.update(new)
            _send(new, signal.SIGKILL if kill_deadline else signal.SIGTERM)
            running = _still_running(seen)
            if not running:
                return len(seen)
            if kill_deadline is None and time.monotonic() >= term_deadline:
                _send(running, signal.SIGKILL)
                kill_deadline = time.monotonic() + KILL_WAIT_S
            elif kill_deadline is not None and time.monotonic() >= kill_deadline:
                say(f"==> still running (another user's, or not stopping): PIDs {', '.join(map(str, sorted(running)))}")
                return len(seen)
            time.sleep(SCAN_EVERY_S)
        except KeyboardInterrupt:
            continue
        except OSError as error:
            say(f"==> could not look for what the task left running: {error}")
            return len(seen)
