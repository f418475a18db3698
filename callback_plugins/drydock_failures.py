"""Callback: record every task failure as a JSON line in $DRYDOCK_FAILURES_FILE, so the
Invoke layer can end a failed run with the one line that says what went wrong."""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_failures
type: notification
short_description: Record task failures for drydock's one-line error messages
description:
  - Appends host, task and message of each failed or unreachable task to the file named
    by the DRYDOCK_FAILURES_FILE environment variable; does nothing when it is unset.
  - A task delegated to another host also records that host (C(delegated_to)).
"""

import json
import os
import re

from ansible.plugins.callback import CallbackBase

# libpq's words when nothing listens on a server's socket, or on its address and port over TCP
# (a stopped server, or a socket folder, host or port that is not its own), with the prefixes
# psycopg 3 and community.postgresql add.
NO_SERVER = re.compile(r'(?:unable to connect to database: )?(?:connection (?:is bad|failed): )?connection to server'
                       r'(?: on socket "(?P<socket>[^"]*)"| at "(?P<host>[^"]*)"(?: \([^)]*\))?, port (?P<port>\d+))'
                       r' failed: (?P<why>No such file or directory|Connection refused)'
                       r'(?: Is the server running (?:locally and accepting connections on that socket'
                       r'|on that host and accepting TCP/IP connections)\?)?')


def _in_drydock_words(line: str, by_the_app: bool = False) -> str:
    """`line` with libpq's words for a server that does not answer replaced by what to do. A
    command's (the app's Python: app_database.py, manage.py) connects by the app's database
    URL, drydock's own modules by drydock_db_socket_dir and drydock_db_port."""
    fix = ("point the host and port of drydock_app_database_url at it" if by_the_app else
           "set drydock_db_socket_dir and drydock_db_port to its own")
    def said(found: re.Match) -> str:
        where = found["socket"] or f"{found['host']}:{found['port']}"
        return f"no database server answers on {where} ({found['why']}): start it, or {fix}"
    return NO_SERVER.sub(said, line)


def _one_line(result: dict) -> str:
    # A loop's result says only "One or more items failed": the first failed item says what.
    failed_item = next((item for item in result.get("results") or [] if isinstance(item, dict) and item.get("failed")),
                       None)
    if failed_item is not None:
        return "<hidden by no_log>" if failed_item.get("censored") else _one_line(failed_item)
    msg = str(result.get("msg") or "")
    stderr = [line for line in (result.get("stderr_lines") or []) if line.strip()]
    if stderr and (not msg or msg.startswith("non-zero return code")):
        msg = stderr[-1]
    elif msg.startswith("non-zero return code") and result.get("cmd"):  # a command that failed without a word
        command = result["cmd"] if isinstance(result["cmd"], str) else " ".join(map(str, result["cmd"]))
        msg = f"{command} exited with status {result.get('rc')}"
    return _in_drydock_words(" ".join(msg.split()), by_the_app="cmd" in result) or "failed"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "drydock_failures"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        # A looped task's own result keeps delegate_to as written (a template); each item's
        # result has it rendered.
        self._item_delegated = {}

    def _record(self, result, kind: str) -> None:
        path = os.environ.get("DRYDOCK_FAILURES_FILE")
        if not path:
            return
        entry = {"kind": kind, "host": result._host.get_name(), "task": result.task_name,
                 "msg": "<hidden by no_log>" if result._result.get("censored") else _one_line(result._result)}
        # A verify of staging builds its reference on the local cluster: when that fails, the
        # line must name the host the task ran on, not only the environment it was for. Not
        # the controller (localhost): drydock runs there, and its message names the file. Nor
        # a name still a template: rendering it is what failed.
        delegated = self._item_delegated.pop((entry["host"], result.task._uuid), result.task.delegate_to)
        if delegated and delegated not in (entry["host"], "localhost") and "{" not in str(delegated):
            entry["delegated_to"] = str(delegated)
        # 0600 whatever the umask: a failure's message may quote the data or a command's stderr.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def v2_runner_item_on_failed(self, result):
        if result.task.delegate_to:
            self._item_delegated[(result.host.get_name(), result.task._uuid)] = result.task.delegate_to

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if not ignore_errors:
            self._record(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")
