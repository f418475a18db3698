"""Callback: record every worker process of ansible-playbook in $DRYDOCK_WORKERS_FILE, and
each one that finished its task, so that drydock can stop the tasks a killed ansible-playbook
left running (drydock/leftovers.py).

Each worker runs one task in a session of its own, and ends that session's process group
when ansible-playbook passes it a SIGTERM or SIGINT. A SIGKILL of ansible-playbook (the OOM
killer, a `kill -9`) passes nothing: the workers finish their task unattended, a migration
step's script or notebook kernel writing on after drydock has released the local database's
lock. Their sessions are how drydock finds what they left, and only ansible-playbook knows
them. A worker that finished its task is recorded as done: what it left in its session (an
app a start command put in the background) was left on purpose."""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_workers
type: notification
short_description: Record ansible-playbook's worker processes for drydock
description:
  - Appends the PID and start time of every worker process ansible-playbook starts, and
    again with C(done) once it has finished its task, to the file named by the
    DRYDOCK_WORKERS_FILE environment variable; does nothing when it is unset.
"""

import os
from multiprocessing import util as multiprocessing_util

from ansible.plugins.callback import CallbackBase

_registered = False


def _append(line: str) -> None:
    path = os.environ.get("DRYDOCK_WORKERS_FILE")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{line}\n".encode())  # one write: lines from many processes never mix
        finally:
            os.close(fd)
    except OSError:
        pass  # never in a task's way: drydock then stops less after a SIGKILL


def _in_a_new_worker(_plugin) -> None:
    """Run by multiprocessing in each worker before its task: `<pid> <start>` now (the start,
    in clock ticks since boot, tells the worker from a later process given its PID), and
    `<pid> <start> done` when its task has finished (multiprocessing runs its finalizers
    when the worker returns; a worker killed or stopped by a signal never writes it)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            start = stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return
    worker = f"{os.getpid()} {start}"
    _append(worker)
    multiprocessing_util.Finalize(None, _append, args=(f"{worker} done",), exitpriority=0)


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "drydock_workers"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        global _registered
        if not _registered:  # loaded in ansible-playbook before it starts any worker
            # Kept for the whole run by Ansible, this plugin is the object the registration needs.
            multiprocessing_util.register_after_fork(self, _in_a_new_worker)
            _registered = True
