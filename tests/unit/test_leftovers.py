"""drydock.leftovers on real processes: what a killed ansible-playbook's worker left in its
session is stopped; what was detached on purpose, or only has a recorded worker's PID, is not."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from drydock import leftovers
from drydock.lock import process_alive, stat_fields

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


def start_of(pid: int) -> str:
    return stat_fields(pid)[19]


def running(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


@pytest.fixture
def worker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = json.loads(proc.stdout.readline())
    yield proc, pids
    for pid in (proc.pid, *pids.values()):
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_the_workers_session_and_its_children_are_stopped_and_the_detached_left(worker, tmp_path, monkeypatch):
    proc, pids = worker
    monkeypatch.setattr(leftovers, "TERM_WAIT_S", 1)  # the stubborn step then gets its SIGKILL soon
    record = tmp_path / "workers.txt"
    record.write_text(f"{proc.pid} {start_of(proc.pid)}\n")
    said = []
    started = time.monotonic()
    stopped = leftovers.stop_left_running(record, said.append)
    assert stopped == 3  # the worker, the stubborn step, the kernel
    assert not running(proc.pid) and not running(pids["stubborn"]) and not running(pids["kernel"])
    assert running(pids["detached"])
    assert time.monotonic() - started < 1 + leftovers.KILL_WAIT_S
    assert len(said) == 1 and said[0].startswith("==> stopping the 3 process(es) of the task ansible-playbook left")


def test_a_recorded_pid_now_another_process_s_is_left_alone(worker, tmp_path):
    proc, pids = worker
    record = tmp_path / "workers.txt"
    record.write_text(f"{proc.pid} 1\n")  # started at another time: not the worker recorded
    assert leftovers.stop_left_running(record, print) == 0
    assert all(running(pid) for pid in (proc.pid, *pids.values()))


def test_nothing_recorded_stops_nothing(tmp_path):
    assert leftovers.stop_left_running(tmp_path / "missing.txt", print) == 0
    (tmp_path / "garbled.txt").write_text("12 x\n\nnot a line\n")
    assert leftovers.recorded_workers(tmp_path / "garbled.txt") == []
