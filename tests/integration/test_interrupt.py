"""Ctrl-C during a push or a rollback, just before and just after its swap: the one line says
which database the target runs, an app stopped before the swap is started again, and what the
line says to do next puts things right."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from drydock.playbook import ansible_env
from tests.conftest import ROOT, app_serves, databases, fingerprint, inv, playbook

OID = "SELECT oid FROM pg_database WHERE datname = 'wagtail_site'"
HOLD = "299.7"  # the held app command's sleep, unique enough to find


@contextmanager
def app_command_held(env: str, action: str, marker: Path, done_first: bool = False, start_fails: bool = False):
    """Make the sandbox app's `action` (start or stop) hang, as a slow service manager would,
    after touching `marker` (and, `done_first`, after doing it); with `start_fails`, its start
    fails. The real script is back afterwards."""
    service = ROOT / ".sandbox" / env / "app-service"
    real = service.with_name("app-service.real")
    shutil.copy2(service, real)
    first = f"{real} {action} && " if done_first else ""
    failing = '[ "$1" = start ] && echo "the app did not start: a test broke it" >&2 && exit 1\n' if start_fails else ""
    service.write_text(f'#!/bin/sh\n[ "$1" = {action} ] && {first}touch {marker} && exec sleep {HOLD}\n{failing}'
                       f'exec {real} "$@"\n')
    try:
        yield
    finally:
        subprocess.run(["pkill", "-f", f"^sleep {HOLD}$"])
        shutil.copy2(real, service)
        real.unlink()


def interrupted(command: str, env: str, marker: Path) -> str:
    """Run `inv COMMAND ENV`, press Ctrl-C once `marker` exists; its last error line."""
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(ROOT), command, env],
                            env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"the {command} never reached the held command"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never left running: it would hold the target's lock for the tests after
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1
    return stderr.strip().splitlines()[-1]


def live_oid(connect) -> int:
    return connect("staging", "postgres").execute(OID).fetchone()[0]


def stopped_while_the_app_would(command: str, action: str, connect, tmp_path,
                                start_fails: bool = False) -> tuple[dict, int, str]:
    """Staging's content and live database before, and the last line of `inv COMMAND staging`
    stopped by Ctrl-C while the app's `action` hangs: its start (after the swap) before it
    starts, or its stop (before the swap) once the app has stopped."""
    before, old = fingerprint(connect("staging")), live_oid(connect)
    with app_command_held("staging", action, tmp_path / action, done_first=action == "stop", start_fails=start_fails):
        return before, old, interrupted(command, "staging", tmp_path / action)


def test_ctrl_c_after_the_swap_says_the_copy_is_live_and_rollback_brings_back_the_old_one(
        pulled, connect, sandbox_env, tmp_path):
    before, old, line = stopped_while_the_app_would("push", "start", connect, tmp_path)
    assert line.startswith("drydock: error: interrupted during restore: the swap ran: staging runs the pushed copy,"
                           " its database from before is wagtail_site__previous"), line
    assert "`inv rollback staging` brings that database back" in line
    assert live_oid(connect) != old
    assert not app_serves(sandbox_env, "staging")  # stopped before the swap, never started
    inv("rollback", "staging", check=True)  # what the line says
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_before_the_swap_leaves_the_old_database_serving_and_a_second_push_goes_through(
        pulled, connect, sandbox_env, tmp_path):
    before, old, line = stopped_while_the_app_would("push", "stop", connect, tmp_path)
    assert line == ("drydock: error: interrupted during restore: the swap did not run: staging runs its old database,"
                    " and its app, stopped before the interruption, was started again and passed its health check;"
                    " the next push drops the side database left behind"), line
    assert app_serves(sandbox_env, "staging")
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert "wagtail_site__incoming" in databases(connect("staging", "postgres"))  # restored, never swapped in
    assert inv("push", "staging").returncode == 0  # what the line says
    assert live_oid(connect) != old
    assert "wagtail_site__incoming" not in databases(connect("staging", "postgres"))
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_during_a_rollback_before_its_exchange_leaves_the_database_serving(
        pulled, connect, sandbox_env, tmp_path):
    if "wagtail_site__previous" not in databases(connect("staging", "postgres")):
        inv("push", "staging", check=True)  # something to roll back to
    before, old, line = stopped_while_the_app_would("rollback", "stop", connect, tmp_path)
    assert line == ("drydock: error: interrupted during rollback: the exchange did not run: staging runs the database"
                    " it ran before, and its app, stopped before the interruption, was started again and passed its"
                    " health check"), line
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_before_the_swap_says_so_when_the_app_does_not_come_back(pulled, connect, sandbox_env, tmp_path):
    before, old, line = stopped_while_the_app_would("push", "stop", connect, tmp_path, start_fails=True)
    assert line == ("drydock: error: interrupted during restore: the swap did not run: staging runs its old database,"
                    " but its app, stopped before the interruption, did not come back (staging: the app did not start:"
                    " a test broke it): start it (its unit or start command, or `ansible-playbook"
                    " playbooks/start_app.yml --limit staging`); the next push drops the side database left behind"), line
    assert not app_serves(sandbox_env, "staging")
    assert live_oid(connect) == old and fingerprint(connect("staging")) == before
    started = playbook("start_app.yml", "--limit", "staging")  # what the line says
    assert started.returncode == 0, started.stdout[-3000:]
    assert app_serves(sandbox_env, "staging")
