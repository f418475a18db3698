"""Callback: record every process ansible-playbook forks (its workers) in
$DRYDOCK_WORKERS_FILE, so that drydock can stop the tasks a killed ansible-playbook left
running (drydock/leftovers.py).

Each worker runs one task in a session of its own, and ends that session's process group
when ansible-playbook passes it a SIGTERM or SIGINT. A SIGKILL of ansible-playbook (the OOM
killer, a `kill -9`) passes nothing: the workers finish their task unattended, a migration
step's script or notebook writing on after drydock has released the local database's lock.
Their sessions are how drydock finds what they left, and only ansible-playbook knows them."""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_workers
type: notification
short_description: Record ansible-playbook's worker processes for drydock
description:
  - Appends the PID and start time of every process ansible-playbook forks to the file
    named by the DRYDOCK_WORKERS_FILE environment variable; does nothing when it is unset.
"""

import os

from ansible.plugins.callback import CallbackBase

_registered = False


def _record_this_process() -> None:
    """In a child just forked: one line, `<pid> <start in clock ticks since boot>`. The start
    tells the worker from a later process given its PID."""
    path = os.environ.get("DRYDOCK_WORKERS_FILE")
    if not path:
        return
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            start = stat.read().rsplit(")", 1)[1].split()[19]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()} {start}\n".encode())  # one write: lines from many processes never mix
        finally:
            os.close(fd)
    except (OSError, IndexError):
        pass  # never in a task's way: drydock then stops less after a SIGKILL, and says nothing wrong


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "drydock_workers"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        global _registered
        if not _registered:  # loaded in ansible-playbook before it forks any worker
            os.register_at_fork(after_in_child=_record_this_process)
            _registered = True
