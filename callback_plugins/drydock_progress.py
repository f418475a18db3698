"""Callback: record when each task starts and how it ends on each host, as JSON lines in
$DRYDOCK_PROGRESS_FILE, so that a run stopped by Ctrl-C can say which steps ran on the host
(the swap above all). Ansible's log cannot: with display_skipped_hosts off, a task's banner
is written with its first result, so a task stopped midway never shows there."""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_progress
type: notification
short_description: Record each task's start and result per host for drydock
description:
  - Appends host, module (action), task name and event (start, ok, failed, skipped,
    unreachable) of each task to the file named by the DRYDOCK_PROGRESS_FILE environment
    variable; does nothing when it is unset.
  - A result's C(drydock_account) (a module's line for drydock's summary) is kept as C(account).
"""

import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "drydock_progress"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, host, task, event: str, account: str | None = None) -> None:
        path = os.environ.get("DRYDOCK_PROGRESS_FILE")
        if not path:
            return
        entry = {"event": event, "host": host.get_name(), "action": task.action, "task": task.get_name()}
        if isinstance(account, str):
            entry["account"] = account
        # Written and flushed per line: the run may be stopped at any moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def v2_runner_on_start(self, host, task):
        self._record(host, task, "start")

    def v2_runner_on_ok(self, result):
        # A module's own line for drydock's summary (e.g. which database an exchange put live).
        self._record(result._host, result._task, "ok", result._result.get("drydock_account"))

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result._host, result._task, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result._host, result._task, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result._host, result._task, "unreachable")
