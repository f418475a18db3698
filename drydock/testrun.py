"""`inv test`: the suite split into shards that run side by side.

Most of the suite's time is spent waiting on one process at a time (ansible-playbook, a
module, PostgreSQL), so one pytest keeps about one of the two cores busy. A second shard
runs in its own copy of the checkout, with its own sandbox on its own block of loopback
addresses, so the two never share a database, a lock, a backup or a run folder. The first
shard runs in place, as a plain `pytest` would, on the checkout's sandbox.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from drydock.lock import stat_fields
from drydock.sandbox import Sandbox, SandboxError
from drydock.validate import InvalidInput

# What `inv lint` and tests/test_lint.py run, from the project root: Ansible's production
# profile on the playbooks and roles, and pyflakes (unused imports, undefined names) on
# drydock's own Python.
ANSIBLE_LINT = ["ansible-lint", "playbooks", "roles"]
PYFLAKES = [sys.executable, "-m", "pyflakes", "tasks.py", "drydock", "tests", "bench", "library", "module_utils",
            "action_plugins", "callback_plugins", "examples"]

# Seconds per test file, summed from `--durations=0` of a fresh-clone two-shard run on
# 2026-12-07 at 03:00Z (shards 20.4 and 21.5 minutes), without the sandbox's start (about
# 30 s), which each shard pays once in its first file; test_backup.py's with the test added
# since (26 s, measured alone). Only the proportions count, and only the split uses them: a
# file not listed counts as DEFAULT_SECONDS.
FILE_SECONDS = {
    "tests/integration/test_push.py": 628,
    "tests/integration/test_faults.py": 399,
    "tests/integration/test_migrate.py": 343,
    "tests/e2e/test_pipeline.py": 250,
    "tests/integration/test_verify.py": 215,
    "tests/integration/test_snapshot.py": 175,
    "tests/integration/test_interrupt.py": 153,
    "tests/integration/test_pull.py": 70,
    "tests/integration/test_site.py": 62,
    "tests/integration/test_backup.py": 61,
    "tests/integration/test_inventory.py": 34,
    "tests/test_lint.py": 22,
    "tests/unit/test_module_cache.py": 19,
    "tests/unit/test_module_inputs.py": 16,
    "tests/unit/test_validate.py": 16,
    "tests/unit/test_helpers.py": 11,
    "tests/integration/test_sandbox.py": 6,
    "tests/integration/test_probe.py": 3,
    "tests/integration/test_archive.py": 1,
    "tests/unit/test_leftovers.py": 1,
    "tests/unit/test_testrun.py": 20,
    "tests/unit/test_cli.py": 5,
    "tests/unit/test_sandbox_up.py": 1,
    "tests/unit/test_bench.py": 1,
    "tests/unit/test_roles.py": 1,
}
DEFAULT_SECONDS = 60
# Shard i > 0 puts its sandbox on 127.0.(SHARD_NET_BASE + i).x; the first shard uses the
# checkout's own (127.0.0.x unless DRYDOCK_SANDBOX_NET says otherwise).
SHARD_NET_BASE = 10
MAX_SHARDS = 8
# What a shard's copy takes when the checkout is not a git work tree: all but local state.
NOT_COPIED = {".git", ".venv", ".sandbox", "backups", "runs", ".pytest_cache"}
# pytest's exit code when a shard's files hold no test that the arguments select.
NO_TESTS_COLLECTED = 5
# pytest options whose value is the next argument (so that value is no test path).
OPTIONS_WITH_VALUE = {"-k", "-m", "-c", "-p", "-o", "-W", "-r", "--deselect", "--ignore", "--ignore-glob",
                      "--basetemp", "--rootdir", "--confcutdir", "--durations", "--maxfail", "--tb",
                      "--log-level", "--junit-xml", "--junitxml", "--override-ini"}
COPIES = Path("/tmp")  # not $TMPDIR: the clusters' OS user must be able to enter the copy
COPY_PREFIX = "drydock-shard-"
PR_SET_PDEATHSIG = 1  # prctl(2), Linux
RUNNER_FILE = "shard-runner.json"  # in each copy: which `inv test` runs it
KEPT_FILE = "shard-kept.txt"  # in a failed shard's copy: kept for its logs, never deleted by a later run


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
    """True when the arguments choose test files or folders under tests/ themselves (then
    nothing is split). An option's value (`-k pull`) is not a path."""
    tests = (root / "tests").resolve()
    previous = ""
    for arg in pytest_args:
        if not arg.startswith("-") and previous not in OPTIONS_WITH_VALUE:
            path = (root / arg.split("::")[0]).resolve()
            if path.exists() and (path == tests or tests in path.parents):
                return True
        previous = arg
    return False


def shard_net(index: int) -> str:
    return f"127.0.{SHARD_NET_BASE + index}"


def _git_files(root: Path, *which: str) -> list[str] | None:
    try:
        listing = subprocess.run(["git", "ls-files", "-z", *which, "--exclude-standard"], cwd=root, capture_output=True)
    except FileNotFoundError:  # no git on this machine
        return None
    if listing.returncode != 0:
        return None
    return [name for name in listing.stdout.decode().split("\0") if name and (root / name).is_file()]


def checkout_files(root: Path) -> list[str]:
    """The files a shard's copy needs: git's tracked and untracked-but-not-ignored files (no
    backups, media or local secrets); without git, everything but local state."""
    listed = _git_files(root, "--cached", "--others")
    if listed is not None:
        return listed
    return [str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_file() and path.relative_to(root).parts[0] not in NOT_COPIED
            and "__pycache__" not in path.parts]


def private_files(root: Path) -> set[str]:
    """The files a copy keeps to its owner: what git does not track (a `.env`, a notebook with
    production rows) may have been private only by its checkout's folder. Without git, none:
    such a checkout is .ci/run's copy of the tracked files."""
    return set(_git_files(root, "--others") or [])


def copy_checkout(root: Path) -> Path:
    """A copy of the checkout for one shard, under /tmp."""
    copy = Path(tempfile.mkdtemp(prefix=COPY_PREFIX, dir=COPIES))
    try:
        # The clusters' OS user (postgres, when we are root) must pass through to the copy's
        # sandbox; nobody else may list it, nor read what git does not track (private_files).
        copy.chmod(0o711 if os.geteuid() == 0 else 0o700)
        (copy / RUNNER_FILE).write_text(json.dumps(_process(os.getpid())))
        private = private_files(root)
        for name in checkout_files(root):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            if name in private:
                _copy_private(root / name, copy / name)
            else:
                shutil.copy2(root / name, copy / name)
        # The checkout's venv, by a link: the shard's pytest runs in it already, and a test that
        # runs the copy's ./inv would otherwise build a venv of its own there, for minutes.
        # (rmtree of the copy removes the link, not what it points to.)
        if (root / ".venv").is_dir():
            (copy / ".venv").symlink_to(root / ".venv", target_is_directory=True)
    except BaseException:
        shutil.rmtree(copy)
        raise
    return copy


def _copy_private(source: Path, target: Path) -> None:
    """Copy `source` readable by its owner alone from the first byte on (shutil.copy2 would
    create the copy with the umask's mode, and only then set the source's)."""
    status = source.stat()
    with open(source, "rb") as reader, open(target, "xb", opener=lambda path, flags: os.open(path, flags, 0o600)) as writer:
        shutil.copyfileobj(reader, writer)
    os.chmod(target, stat.S_IMODE(status.st_mode) & 0o700)
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None if there is none: a PID
    with its start time names one process, even once the PID is reused."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def _process(pid: int) -> dict:
    """A record that names process `pid` (its PID and start time), as RUNNER_FILE keeps it."""
    return {"pid": pid, "started": _started(pid)}


def _runs(record) -> bool:
    """Whether the process a record of _process() names still runs."""
    return (isinstance(record, dict) and isinstance(record.get("pid"), int) and record.get("started") is not None
            and _started(record["pid"]) == record["started"])


def _record_shard(copy: Path, pid: int) -> None:
    """Add the shard's pytest to its copy's RUNNER_FILE: it outlives a killed runner while it
    takes its sandbox down, and its copy is in use until it ends."""
    runner = json.loads((copy / RUNNER_FILE).read_text())
    (copy / RUNNER_FILE).write_text(json.dumps(dict(runner, shard=_process(pid))))


def clear_leftover_shards(say: Callable[[str], None]) -> None:
    """Shard copies that an `inv test` left when it was killed (it deletes its own otherwise):
    stop a sandbox still running there, which holds the shard's addresses (by the PIDs it
    recorded), then delete the copy, unless it was kept for a failed shard's logs. A copy whose
    runner or shard still runs is in use: refuse if its sandbox is up rather than pull it away,
    and leave the copy alone."""
    for copy in sorted(COPIES.glob(f"{COPY_PREFIX}*")):
        pids = copy / ".sandbox" / "pids.json"  # written from the sandbox's first start on
        # Only a copy this user made: another user's files under /tmp could name any process.
        # Not through a symlink either, which could point at anyone's files.
        try:
            if any(path.is_symlink() or path.lstat().st_uid != os.getuid()
                   for path in (copy, pids.parent, pids) if os.path.lexists(path)):
                continue
        except OSError:  # gone meanwhile
            continue
        try:
            runner = json.loads((copy / RUNNER_FILE).read_text())
        except (OSError, ValueError):
            runner = None  # being made or updated this moment, or not made by this code
        made_here = isinstance(runner, dict) and isinstance(runner.get("pid"), int) and "started" in runner
        records = (runner, runner.get("shard")) if made_here else ()
        user = next((record for record in records if _runs(record)), None)
        if user is not None:
            if pids.exists():
                raise SandboxError(f"a test run (pid {user['pid']}) still uses the shard sandbox in {copy}: "
                                   "wait for it, or stop it")
            continue
        if pids.exists():
            say(f"stopping a shard sandbox left running in {pids.parent}")
            Sandbox(root=pids.parent, say=lambda message: None).down()
        if made_here and not (copy / KEPT_FILE).exists():
            say(f"deleting {copy}: a shard's copy left by an `inv test` that was stopped")
            try:
                shutil.rmtree(copy)
            except OSError as error:
                say(f"drydock: {copy} could not be deleted ({error}): the next `inv test` tries again")


class _Output:
    """Each shard's lines, prefixed with its number, never two at once."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.lock = threading.Lock()

    def pump(self, proc: subprocess.Popen, prefix: str) -> None:
        for line in proc.stdout:  # read to the end even if showing fails: pytest must not block
            try:
                with self.lock:
                    self.say(f"{prefix}{line.rstrip()}")
            except (OSError, ValueError):
                pass


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _interrupt_when_the_runner_dies() -> None:
    """In a shard, before pytest starts: if the runner dies, even by SIGKILL, the kernel sends
    this shard SIGINT, so pytest tears its sandbox down instead of running on unattended
    (an orphaned shard would take down a sandbox the next run is using)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def _run_alone(command: list[str], root: Path) -> int:
    """One plain pytest, on the terminal. Stopped, it gets one SIGINT and is waited for while
    it takes its sandbox down (subprocess.run would kill it 0.25 s after a Ctrl-C)."""
    previous_handler = signal.signal(signal.SIGTERM, _terminate)  # clean up as on Ctrl-C
    # In a session of its own, as a shard (see run): a Ctrl-C reaches it through the runner only.
    proc = subprocess.Popen(command, cwd=root, env=dict(os.environ), start_new_session=True,
                            preexec_fn=_interrupt_when_the_runner_dies)
    try:
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        raise
    finally:
        _wait_out(proc)
        signal.signal(signal.SIGTERM, previous_handler)


def _wait_out(proc: subprocess.Popen) -> None:
    """Wait until a pytest that was given its SIGINT has ended. A second Ctrl-C or a SIGTERM
    meanwhile does not cut the wait short: the runner would die, and the kernel would give the
    pytest a second SIGINT, which cuts its sandbox's teardown short (SIGKILL the runner to
    leave at once)."""
    while True:
        try:
            proc.wait()
            return
        except (KeyboardInterrupt, SystemExit):
            continue


def run(root: Path, pytest_args: list[str], shards: int, say: Callable[[str], None] = print) -> int:
    """Run the suite in `shards` side-by-side pytest processes; return the exit code."""
    if shards > MAX_SHARDS:
        raise InvalidInput(f"invalid --shards {shards}: at most {MAX_SHARDS}")
    command = [sys.executable, "-m", "pytest", *pytest_args]
    if shards == 1 or names_paths(root, pytest_args):
        return _run_alone(command, root)
    own_net = Sandbox(root=root / ".sandbox", say=say).net
    if own_net in {shard_net(index) for index in range(1, shards)}:
        raise SandboxError(f"the checkout's sandbox is on {own_net}.x, which a shard needs: "
                           "set another DRYDOCK_SANDBOX_NET or run --shards 1")
    clear_leftover_shards(say)
    own_sandbox_existed = (root / ".sandbox").exists()
    plan = split(test_files(root), shards)
    output = _Output(say)
    workers: list[tuple[Path, subprocess.Popen, threading.Thread]] = []
    previous_handler = signal.signal(signal.SIGTERM, _terminate)  # clean up as on Ctrl-C
    # A hang-up ends the runner (drydock's commands would stop as on Ctrl-C, writing nowhere):
    # each shard gets SIGINT from the kernel then and takes its sandbox down.
    previous_hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        for index, files in enumerate(plan):
            folder, env = root, dict(os.environ)
            if index > 0:
                folder = copy_checkout(root)
                env.update(DRYDOCK_ROOT=str(folder), ANSIBLE_CONFIG=str(folder / "ansible.cfg"),
                           DRYDOCK_SANDBOX_NET=shard_net(index))
                for shared in ("DRYDOCK_BACKUPS", "DRYDOCK_RUNS"):  # the copy's own, not the checkout's
                    env.pop(shared, None)
            prefix = f"[{index + 1}/{len(plan)}] "
            say(f"{prefix}{len(files)} files in {folder}: {' '.join(Path(f).stem for f in files)}")
            # -v: a line per test as it ends, so the interleaved output shows progress.
            # preexec_fn is unsafe once threads run: every shard starts before any output thread.
            # Its own session: a signal to the runner's process group (a terminal's Ctrl-C, a
            # CI's time limit) reaches the runner alone, which passes each shard one SIGINT, as
            # it does when the runner alone is signalled. Two would cut a teardown short.
            proc = subprocess.Popen([*command, "-v", *files], cwd=folder, env=env, text=True, errors="replace",
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                                    start_new_session=True, preexec_fn=_interrupt_when_the_runner_dies)
            if folder != root:
                _record_shard(folder, proc.pid)
            workers.append((folder, proc, threading.Thread(target=output.pump, args=(proc, prefix), daemon=True)))
        for _folder, _proc, thread in workers:
            thread.start()
        for _folder, proc, thread in workers:
            proc.wait()
            thread.join()
    except BaseException:  # Ctrl-C, SIGTERM, or a shard that would not start
        for _folder, proc, _thread in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        raise
    finally:
        # Let every pytest tear its sandbox down before its copy goes.
        for _folder, proc, _thread in workers:
            _wait_out(proc)
        signal.signal(signal.SIGTERM, previous_handler)
        signal.signal(signal.SIGHUP, previous_hangup)
        for folder, proc, _thread in workers:
            if folder != root:
                _clean_up(folder, keep=proc.returncode not in (0, NO_TESTS_COLLECTED), say=say)
            elif not own_sandbox_existed:
                _stop_sandbox_of_killed_shard(root, proc.returncode, say)
    codes = [proc.returncode for _folder, proc, _thread in workers]
    if all(code == NO_TESTS_COLLECTED for code in codes):
        return NO_TESTS_COLLECTED
    return next((code for code in codes if code not in (0, NO_TESTS_COLLECTED)), 0)


def _stop_sandbox_of_killed_shard(root: Path, returncode: int, say: Callable[[str], None]) -> None:
    """The checkout's own shard takes down the sandbox it started, unless a signal killed its
    pytest (a SIGKILL or SIGTERM sent to the shard itself, or the machine short of memory):
    then it is taken down here. Only called when the checkout had no sandbox before the run."""
    sandbox = root / ".sandbox"
    if returncode >= 0 or not sandbox.exists():
        return
    say(f"drydock: stopping the sandbox the killed shard left running in {sandbox}")
    try:
        Sandbox(root=sandbox, say=lambda message: None).down()
    except (SandboxError, OSError, ValueError) as error:  # the shards' copies are cleaned up after this
        say(f"drydock: the sandbox in {sandbox} did not stop: {error}")


def _clean_up(copy: Path, keep: bool, say: Callable[[str], None]) -> None:
    """Stop a shard's sandbox if pytest could not (killed), then delete its copy; a failed
    shard's copy is kept for its runs/ (journals and Ansible logs)."""
    if keep:  # first: a later run that stops the sandbox left here must not delete these logs
        (copy / KEPT_FILE).write_text("This shard did not pass: its copy is kept for its runs/ (journals and Ansible"
                                      " logs). Delete the folder when you are done with them.\n")
    sandbox = copy / ".sandbox"
    if sandbox.exists():
        try:
            Sandbox(root=sandbox, say=lambda message: None).down()
        except SandboxError as error:
            say(f"drydock: the shard sandbox in {sandbox} did not stop: {error}")
            return
    if keep:
        say(f"this shard did not pass: its runs and logs are kept in {copy / 'runs'} (delete {copy} when done)")
    else:
        shutil.rmtree(copy)
