"""drydock.leftovers on real processes: what an unfinished task left in its worker's session
is stopped; what a finished task left, what was detached on purpose, and what only shares a
recorded worker's number, are not."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from drydock import leftovers
from drydock.lock import stat_fields

# A stand-in for an Ansible worker (a session of its own) in the middle of its task: a step
# that ignores SIGTERM, its child in a session of its own (as a notebook's kernel is), and a
# process it detached on purpose (as a snapshot's background copy, or a daemon, is).
WORKER = r"""
import json, os, signal, subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
stubborn = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
kernel = subprocess.Popen(sleep, start_new_session=True)
read, write = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(write, str(os.getpid()).encode())
        time.sleep(300)
    os._exit(0)
detached = int(os.read(read, 20))
print(json.dumps({"stubborn": stubborn.pid, "kernel": kernel.pid, "detached": detached}), flush=True)
time.sleep(300)
"""

# A session whose leader has ended (as a worker killed with ansible-playbook), with a process left in it.
ORPHANED_SESSION = r"""
import os, subprocess, sys
os.setsid()
left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(os.getpid(), left.pid, flush=True)
"""


def start_of(pid: int) -> str:
    return stat_fields(pid)[19]


def running(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def stop_all(*pids: int) -> None:
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def worker():
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = json.loads(proc.stdout.readline())
    yield proc, pids
    stop_all(proc.pid, *pids.values())
    proc.wait()


def orphaned_session(env: dict) -> tuple[int, str, int]:
    """(the ended leader's PID, its start, the PID of the process left in its session)."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHANED_SESSION], stdout=subprocess.PIPE, text=True, env=env)
    leader, left = map(int, proc.stdout.readline().split())
    start = start_of(leader)
    proc.wait()
    return leader, start, left


def test_an_unfinished_workers_session_and_its_children_are_stopped_and_the_detached_left(worker, tmp_path,
                                                                                           monkeypatch):
    proc, pids = worker
    monkeypatch.setattr(leftovers, "TERM_WAIT_S", 1)  # the stubborn step then gets its SIGKILL soon
    record = tmp_path / "workers.txt"
    record.write_text(f"{proc.pid} {start_of(proc.pid)}\n")
    said = []
    started = time.monotonic()
    assert leftovers.stop_left_running(record, said.append) == 3  # the worker, the stubborn step, the kernel
    assert not running(proc.pid) and not running(pids["stubborn"]) and not running(pids["kernel"])
    assert running(pids["detached"])
    assert time.monotonic() - started < 1 + leftovers.KILL_WAIT_S
    assert said == [f"==> waiting for the 3 process(es) of the task that did not finish to stop (PIDs "
                    f"{', '.join(map(str, sorted([proc.pid, pids['stubborn'], pids['kernel']])))}) before the lock is"
                    " released"]


def test_what_a_finished_task_left_in_its_session_is_left_alone(worker, tmp_path):
    proc, pids = worker
    record = tmp_path / "workers.txt"
    record.write_text(f"{proc.pid} {start_of(proc.pid)}\n{proc.pid} {start_of(proc.pid)} done\n")
    assert leftovers.stop_left_running(record, print) == 0
    assert all(running(pid) for pid in (proc.pid, *pids.values()))


def test_a_recorded_pid_now_another_process_s_is_left_alone(worker, tmp_path):
    proc, pids = worker
    record = tmp_path / "workers.txt"
    record.write_text(f"{proc.pid} 1\n")  # started at another time: not the worker recorded
    assert leftovers.stop_left_running(record, print) == 0
    assert all(running(pid) for pid in (proc.pid, *pids.values()))


def test_an_ended_workers_session_counts_only_with_this_runs_environment(tmp_path):
    record = tmp_path / "workers.txt"
    ours = orphaned_session(dict(os.environ, DRYDOCK_WORKERS_FILE=str(record)))
    # Another program's session under a number a worker of this run had (the PIDs wrapped around).
    theirs = orphaned_session(dict(os.environ, DRYDOCK_WORKERS_FILE=str(tmp_path / "another-run.txt")))
    try:
        record.write_text(f"{ours[0]} {ours[1]}\n{theirs[0]} {theirs[1]}\n")
        assert not running(ours[0]) and not running(theirs[0])
        assert leftovers.stop_left_running(record, print) == 1
        assert not running(ours[2]) and running(theirs[2])
    finally:
        stop_all(ours[2], theirs[2])


def test_nothing_recorded_stops_nothing(tmp_path):
    assert leftovers.stop_left_running(tmp_path / "missing.txt", print) == 0
    (tmp_path / "garbled.txt").write_text("12 x\n\nnot a line\n12 34 maybe\n")
    assert leftovers.unfinished_workers(tmp_path / "garbled.txt") == []
