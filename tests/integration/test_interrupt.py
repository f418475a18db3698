"""Ctrl-C during a push, just before and just after its swap: the one line says which
database the target runs, and what it says to do next puts things right."""
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
from tests.conftest import ROOT, app_serves, databases, fingerprint, inv

OID = "SELECT oid FROM pg_database WHERE datname = 'wagtail_site'"
HOLD = "299.7"  # the held app command's sleep, unique enough to find


@contextmanager
def app_command_held(env: str, action: str, marker: Path):
    """Make the sandbox app's `action` (start or stop) hang, as a slow service manager would,
    after touching `marker`; the real script is back afterwards."""
    service = ROOT / ".sandbox" / env / "app-service"
    real = service.with_name("app-service.real")
    shutil.copy2(service, real)
    service.write_text(f'#!/bin/sh\n[ "$1" = {action} ] && touch {marker} && exec sleep {HOLD}\nexec {real} "$@"\n')
    try:
        yield
    finally:
        subprocess.run(["pkill", "-f", f"^sleep {HOLD}$"])
        shutil.copy2(real, service)
        real.unlink()


def interrupted_push(env: str, marker: Path) -> str:
    """Run `inv push ENV`, press Ctrl-C once `marker` exists; its last error line."""
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "push", env],
                            env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the push never reached the held command"
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


def push_stopped_while_the_app_would(action: str, connect, tmp_path) -> tuple[dict, int, str]:
    """Staging's content and live database before, and the last line of a push to it
    stopped by Ctrl-C while the app's `action` (start: after the swap; stop: before it) hangs."""
    before, old = fingerprint(connect("staging")), live_oid(connect)
    with app_command_held("staging", action, tmp_path / action):
        return before, old, interrupted_push("staging", tmp_path / action)


def test_ctrl_c_after_the_swap_says_the_copy_is_live_and_rollback_brings_back_the_old_one(
        pulled, connect, sandbox_env, tmp_path):
    before, old, line = push_stopped_while_the_app_would("start", connect, tmp_path)
    assert line.startswith("drydock: error: interrupted during restore: the swap ran: staging runs the pushed copy,"
                           " its database from before is wagtail_site__previous"), line
    assert "`inv rollback staging` brings that database back" in line
    assert live_oid(connect) != old
    assert not app_serves(sandbox_env, "staging")  # stopped before the swap, never started
    inv("rollback", "staging", check=True)  # what the line says
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_ctrl_c_before_the_swap_says_the_old_database_is_live_and_a_second_push_goes_through(
        pulled, connect, sandbox_env, tmp_path):
    before, old, line = push_stopped_while_the_app_would("stop", connect, tmp_path)
    assert line.startswith("drydock: error: interrupted during restore: the swap did not run: staging runs its old"
                           " database"), line
    assert "push again" in line
    assert live_oid(connect) == old
    assert fingerprint(connect("staging")) == before
    assert "wagtail_site__incoming" in databases(connect("staging", "postgres"))  # restored, never swapped in
    assert inv("push", "staging").returncode == 0  # what the line says
    assert live_oid(connect) != old
    assert "wagtail_site__incoming" not in databases(connect("staging", "postgres"))
    assert app_serves(sandbox_env, "staging")
