"""Ctrl-C during a push or a rollback, just before and just after its swap: the one line says
which database the target runs, an app stopped before the swap is started again, and what the
line says to do next puts things right."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from drydock import dumps, journal
from drydock.paths import runs_dir
from tests.conftest import LIVE_OID, ROOT, app_serves, databases, fingerprint, interrupted_when, inv

HOLD = "299.7"  # the held app command's sleep, unique enough to find


# What the held stop has done when Ctrl-C comes: stopped the app, or only begun to (the app
# goes down a few seconds later, as a slow graceful shutdown would, after drydock's restart
# has looked at it: the old PID alone is killed then, and `killed` touched).
STOPPED = '"$real" stop; '
STOP_UNDER_WAY = ('pid=$(cat {pidfile}); setsid sh -c "sleep 6; kill $pid; touch {killed}" '
                  '</dev/null >/dev/null 2>&1 & ')


@contextmanager
def app_command_held(env: str, action: str, marker: Path, before_hold: str = "", start_fails: bool = False):
    """Make the sandbox app's `action` (start or stop) hang the first time it runs, as a slow
    service manager would: it runs the shell `before_hold` ($real: the real script), touches
    `marker` and sleeps. Later calls run the real script; with `start_fails`, a start fails.
    The real script is back afterwards."""
    service = ROOT / ".sandbox" / env / "app-service"
    real = service.with_name("app-service.real")
    shutil.copy2(service, real)
    failing = '[ "$1" = start ] && echo "the app did not start: a test broke it" >&2 && exit 1\n' if start_fails else ""
    service.write_text(f'#!/bin/sh\nreal={real}\n'
                       f'if [ "$1" = {action} ] && [ ! -e {marker} ]; then {before_hold}touch {marker}; exec sleep {HOLD}; fi\n'
                       f'{failing}exec "$real" "$@"\n')
    try:
        yield
    finally:
        subprocess.run(["pkill", "-f", f"^sleep {HOLD}$"])
        shutil.copy2(real, service)
        real.unlink()


def live_oid(connect) -> int:
    return connect("staging", "postgres").execute(LIVE_OID).fetchone()[0]


def stopped_while_the_app_would(command: str, action: str, connect, tmp_path, before_hold: str = "",
                                start_fails: bool = False) -> tuple[dict, int, str]:
    """Staging's content and live database before, and the last line of `inv COMMAND staging`
    stopped by Ctrl-C while the app's `action` hangs (see app_command_held)."""
    before, old = fingerprint(connect("staging")), live_oid(connect)
    with app_command_held("staging", action, tmp_path / action, before_hold, start_fails):
        return before, old, interrupted_when((tmp_path / action).exists, command, "staging")


def test_ctrl_c_after_the_swap_says_the_copy_is_live_and_rollback_brings_back_the_old_one(
        staging_at_the_local_schema, connect, sandbox_env, tmp_path):
    before, old, line = stopped_while_the_app_would("push", "start", connect, tmp_path)  # before it starts
    assert line.startswith("drydock: error: interrupted during restore: the swap ran: staging runs the pushed copy,"
                           " its database from before is wagtail_site__previous"), line
    assert "`inv rollback staging` brings that database back" in line
    assert "`inv app.restart staging` starts the app on the pushed copy, unchecked" in line  # the other way on
    assert live_oid(connect) != old
    assert not app_serves(sandbox_env, "staging")  # stopped before the swap, never started
    inv("rollback", "staging", check=True)  # what the line says
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_before_the_swap_leaves_the_old_database_serving_and_a_second_push_goes_through(
        staging_at_the_local_schema, connect, sandbox_env, tmp_path):
    before, old, line = stopped_while_the_app_would("push", "stop", connect, tmp_path, STOPPED)
    assert line == ("drydock: error: interrupted during restore: the swap did not run: staging runs its old database,"
                    " and its app, stopped before the interruption, was restarted and passed its health check;"
                    " the next push drops any side database left behind"), line
    assert app_serves(sandbox_env, "staging")
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert "wagtail_site__incoming" in databases(connect("staging", "postgres"))  # restored, never swapped in
    assert inv("push", "staging").returncode == 0  # what the line says
    assert live_oid(connect) != old
    assert "wagtail_site__incoming" not in databases(connect("staging", "postgres"))
    assert app_serves(sandbox_env, "staging")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_before_the_swap_stops_the_push_as_ctrl_c_does(stop, staging_at_the_local_schema, connect,
                                                                          sandbox_env, tmp_path):
    """`timeout`, a cancelled CI job (SIGTERM) or a lost terminal or SSH session (SIGHUP)
    while the app is stopped: Python's default would end drydock at once, leaving the app
    down and the lock behind. After a hang-up the line goes only to the journal."""
    before, old = fingerprint(connect("staging")), live_oid(connect)
    with app_command_held("staging", "stop", tmp_path / "stop", STOPPED):
        line = interrupted_when((tmp_path / "stop").exists, "push", "staging", stop=stop)
    said = ("interrupted during restore: the swap did not run: staging runs its old database, and its app, stopped"
            " before the interruption, was restarted and passed its health check; the next push drops any side"
            " database left behind")
    assert line == (f"drydock: error: {said}" if stop == signal.SIGTERM else "")
    assert [run["error"] for run in journal.list_runs() if run["task"] == "push"][-1] == said
    assert app_serves(sandbox_env, "staging")
    assert live_oid(connect) == old and fingerprint(connect("staging")) == before
    assert not (runs_dir() / "locks" / "staging.lock").exists()


def test_ctrl_c_during_a_rollback_before_its_exchange_leaves_the_database_serving(
        staging_at_the_local_schema, connect, sandbox_env, tmp_path):
    if "wagtail_site__previous" not in databases(connect("staging", "postgres")):
        inv("push", "staging", check=True)  # something to roll back to
    before, old, line = stopped_while_the_app_would("rollback", "stop", connect, tmp_path, STOPPED)
    assert line == ("drydock: error: interrupted during rollback: the exchange did not run: staging runs the database"
                    " it ran before, and its app, stopped before the interruption, was restarted and passed its"
                    " health check"), line
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_while_the_app_is_on_its_way_down_still_leaves_it_serving(staging_at_the_local_schema, connect, sandbox_env, tmp_path):
    """A stop cut short may leave the app still "running" to a start, then gone: the restart
    finishes the stop before it starts the app."""
    killed = tmp_path / "killed"
    under_way = STOP_UNDER_WAY.format(pidfile=ROOT / ".sandbox" / "staging" / "app.pid", killed=killed)
    _, old, line = stopped_while_the_app_would("push", "stop", connect, tmp_path, under_way)
    assert line.endswith("and its app, stopped before the interruption, was restarted and passed its health check;"
                         " the next push drops any side database left behind"), line
    deadline = time.monotonic() + 30
    while not killed.exists():  # the old app's end, come late
        assert time.monotonic() < deadline, "the old app was never killed"
        time.sleep(0.2)
    assert app_serves(sandbox_env, "staging")
    assert live_oid(connect) == old


def test_ctrl_c_before_the_swap_says_so_when_the_app_does_not_come_back(staging_at_the_local_schema, connect, sandbox_env, tmp_path):
    before, old, line = stopped_while_the_app_would("push", "stop", connect, tmp_path, STOPPED, start_fails=True)
    assert line == ("drydock: error: interrupted during restore: the swap did not run: staging runs its old database,"
                    " but its app, stopped before the interruption, did not come back (staging: the app did not start:"
                    " a test broke it): restart it: inv app.restart staging (or its unit or start command); the next"
                    " push drops any side database left behind"), line
    assert not app_serves(sandbox_env, "staging")
    assert live_oid(connect) == old and fingerprint(connect("staging")) == before
    assert inv("app.restart", "production").returncode == 1  # not interactive, no --yes: refused
    restarted = inv("app.restart", "staging", check=True)  # what the line says
    assert restarted.stdout.strip().splitlines()[-1] == "staging's app was restarted and passed its health check"
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_during_a_production_push_names_its_safety_backup(connect, sandbox_env, tmp_path):
    """The safety backup is taken before the app stops: interrupted there, the push's one
    line still says where it is."""
    inv("pull", "production", check=True)  # a copy of a fresh backup: the push guard lets it through
    before = fingerprint(connect("production"))
    with app_command_held("production", "stop", tmp_path / "stop", STOPPED):
        line = interrupted_when((tmp_path / "stop").exists, "push", "production", "--yes")
    assert line.startswith("drydock: error: interrupted during restore: the swap did not run: production runs its old"
                           " database"), line
    safety = dumps.latest("production", kind="safety")
    assert line.endswith(f"; its safety backup, taken before the interruption: {safety.path}"), line
    assert safety.path.is_file()
    assert fingerprint(connect("production")) == before
    assert app_serves(sandbox_env, "production")
    assert inv("push", "production", "--yes").returncode == 0  # what the line says: it drops the side database
    assert "wagtail_site__incoming" not in databases(connect("production", "postgres"))
