"""`inv test`: the suite split into shards that run side by side.

Most of the suite's time is spent waiting on one process at a time (ansible-playbook, a
module, PostgreSQL), so one pytest keeps about one of the two cores busy. A second shard
runs in its own copy of the checkout, with its own sandbox on its own block of loopback
addresses, so the two never share a database, a lock, a backup or a run folder. The first
shard runs in place, as a plain `pytest` would, on the default sandbox.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from drydock.sandbox import Sandbox, SandboxError

# Seconds per test file in a whole-suite run on this machine (2026-12-03, one pytest), without
# the sandbox's start, which each shard pays once. Only the split uses them: a file not listed
# counts as DEFAULT_SECONDS.
FILE_SECONDS = {
    "tests/integration/test_faults.py": 428,
    "tests/integration/test_migrate.py": 227,
    "tests/integration/test_snapshot.py": 205,
    "tests/integration/test_verify.py": 204,
    "tests/e2e/test_pipeline.py": 175,
    "tests/integration/test_push.py": 155,
    "tests/integration/test_pull.py": 61,
    "tests/integration/test_backup.py": 37,
    "tests/integration/test_site.py": 31,
    "tests/test_lint.py": 22,
    "tests/integration/test_sandbox.py": 10,
    "tests/unit/test_validate.py": 1,
    "tests/integration/test_archive.py": 2,
    "tests/unit/test_roles.py": 1,
    "tests/unit/test_helpers.py": 1,
    "tests/unit/test_testrun.py": 1,
}
DEFAULT_SECONDS = 60
# Shard i > 0 puts its sandbox on 127.0.(SHARD_NET_BASE + i).x, away from the default 127.0.0.x
# (which may be up for the demo or a benchmark while the tests run).
SHARD_NET_BASE = 10
# What a shard's copy of the checkout leaves out: local state, caches, the venv (shared).
NOT_COPIED = {".git", ".venv", ".sandbox", "backups", "runs", "__pycache__", ".pytest_cache"}
# pytest's exit code when a shard's files hold no test that the arguments select.
NO_TESTS_COLLECTED = 5


def test_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in (root / "tests").rglob("test_*.py"))


def split(files: list[str], shards: int) -> list[list[str]]:
    """Spread the files over `shards` so that each takes about as long: the longest file
    first, each into the shard with the least time so far. Each shard keeps pytest's order."""
    loads: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(shards)]
    for name in sorted(files, key=lambda f: -FILE_SECONDS.get(f, DEFAULT_SECONDS)):
        index = min(range(shards), key=lambda i: loads[i][0])
        seconds, names = loads[index]
        loads[index] = (seconds + FILE_SECONDS.get(name, DEFAULT_SECONDS), names + [name])
    return [sorted(names) for _seconds, names in loads if names]


def names_paths(root: Path, pytest_args: list[str]) -> bool:
    """True when the arguments choose test files or folders themselves (then nothing is split)."""
    return any(not arg.startswith("-") and (root / arg.split("::")[0]).exists() for arg in pytest_args)


def copy_checkout(root: Path) -> Path:
    """A copy of the checkout for one shard, under /tmp. The clusters' OS user must enter it."""
    copy = Path(tempfile.mkdtemp(prefix="drydock-shard-"))
    copy.chmod(0o755)
    shutil.copytree(root, copy, dirs_exist_ok=True, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if n in NOT_COPIED])
    return copy


def _stream(proc: subprocess.Popen, prefix: str, say: Callable[[str], None]) -> None:
    for line in proc.stdout:
        say(f"{prefix}{line.rstrip()}")


def run(root: Path, pytest_args: list[str], shards: int, say: Callable[[str], None] = print) -> int:
    """Run the suite in `shards` side-by-side pytest processes; return the exit code."""
    command = [sys.executable, "-m", "pytest", *pytest_args]
    if shards == 1 or names_paths(root, pytest_args):
        return subprocess.run(command, cwd=root, env=dict(os.environ)).returncode
    plan = split(test_files(root), shards)
    workers: list[tuple[Path, subprocess.Popen, threading.Thread]] = []
    try:
        for index, files in enumerate(plan):
            folder, env = root, dict(os.environ)
            if index > 0:
                folder = copy_checkout(root)
                env.update(DRYDOCK_ROOT=str(folder), ANSIBLE_CONFIG=str(folder / "ansible.cfg"),
                           DRYDOCK_SANDBOX_NET=f"127.0.{SHARD_NET_BASE + index}")
                for shared in ("DRYDOCK_BACKUPS", "DRYDOCK_RUNS"):  # the copy's own, not the checkout's
                    env.pop(shared, None)
            prefix = f"[{index + 1}/{len(plan)}] "
            say(f"{prefix}{len(files)} files in {folder}: {' '.join(Path(f).stem for f in files)}")
            # -v: a line per test as it ends, so the interleaved output shows progress.
            proc = subprocess.Popen([*command, "-v", *files], cwd=folder, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
            thread = threading.Thread(target=_stream, args=(proc, prefix, say), daemon=True)
            thread.start()
            workers.append((folder, proc, thread))
        for _folder, proc, thread in workers:
            proc.wait()
            thread.join()
    finally:
        # On Ctrl-C every pytest got the SIGINT too: wait while each tears its sandbox down.
        for _folder, proc, _thread in workers:
            proc.wait()
        for folder, proc, _thread in workers:
            if folder != root:
                _clean_up(folder, keep=proc.returncode not in (0, NO_TESTS_COLLECTED), say=say)
    codes = [proc.returncode for _folder, proc, _thread in workers]
    if all(code == NO_TESTS_COLLECTED for code in codes):
        return NO_TESTS_COLLECTED
    return next((code for code in codes if code not in (0, NO_TESTS_COLLECTED)), 0)


def _clean_up(copy: Path, keep: bool, say: Callable[[str], None]) -> None:
    """Stop a shard's sandbox if pytest could not (killed), then delete its copy; a failed
    shard's copy is kept for its runs/ (journals and Ansible logs)."""
    sandbox = copy / ".sandbox"
    if sandbox.exists():
        try:
            Sandbox(root=sandbox, say=lambda message: None).down()
        except SandboxError as error:
            say(f"drydock: the shard sandbox in {sandbox} did not stop: {error}")
            return
    if keep:
        say(f"the failed shard's runs and logs are kept in {copy / 'runs'}")
    else:
        shutil.rmtree(copy)
