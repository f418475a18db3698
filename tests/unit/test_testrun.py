"""`inv test`'s shards: every test file runs exactly once, in shards of similar length, each
sandbox on its own loopback block."""
import json
import os

import pytest

from drydock import testrun
from drydock.paths import project_root
from drydock.sandbox import SandboxError, environments, sandbox_net
from drydock.validate import InvalidInput


def test_split_runs_every_file_once_in_shards_of_similar_length():
    files = testrun.test_files(project_root())
    assert "tests/integration/test_faults.py" in files and "tests/unit/test_testrun.py" in files
    shards = testrun.split(files, 2)
    assert sorted(f for shard in shards for f in shard) == sorted(files)
    seconds = [sum(testrun.FILE_SECONDS.get(f, testrun.DEFAULT_SECONDS) for f in shard) for shard in shards]
    assert max(seconds) - min(seconds) <= max(testrun.FILE_SECONDS.values()) / 4, seconds
    assert all(shard == sorted(shard) for shard in shards)  # pytest's own order inside a shard


def test_split_never_makes_an_empty_shard():
    assert testrun.split(["tests/a.py"], 3) == [["tests/a.py"]]


def test_naming_test_files_is_seen_but_options_and_their_values_are_not():
    root = project_root()
    assert testrun.names_paths(root, ["tests/unit/test_testrun.py::test_split_never_makes_an_empty_shard"])
    assert testrun.names_paths(root, ["-x", "tests/unit"])
    assert not testrun.names_paths(root, ["-k", "pull", "-x"])
    assert not testrun.names_paths(root, ["-k", "tests", "-c", "pyproject.toml", "--basetemp", "/tmp"])
    assert not testrun.names_paths(root, ["roles"])  # exists, but holds no tests


def test_a_shard_copies_the_code_but_no_local_state_or_data():
    files = testrun.checkout_files(project_root())
    assert "drydock/testrun.py" in files and "tests/conftest.py" in files and "ansible.cfg" in files
    assert not [f for f in files if f.split("/")[0] in {".venv", ".sandbox", "backups", "runs", ".git"}]
    assert not [f for f in files if "__pycache__" in f or f.startswith("bench/results/2")]


def test_without_git_a_shard_copies_all_but_local_state(tmp_path):
    for name in (".venv/bin/python", "runs/x/journal.jsonl", "backups/production/d/dump", ".sandbox/pgpass",
                 "drydock/__pycache__/a.pyc", "drydock/a.py", "roles/r/files/runs/kept.txt", "ansible.cfg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sorted(testrun.checkout_files(tmp_path)) == ["ansible.cfg", "drydock/a.py", "roles/r/files/runs/kept.txt"]


def test_too_many_shards_is_refused_before_anything_starts():
    with pytest.raises(InvalidInput, match="at most 8"):
        testrun.run(project_root(), [], shards=9)


@pytest.mark.parametrize("net", ["127.0.11", "127.255.0"])
def test_sandbox_net_is_any_loopback_block(monkeypatch, net):
    monkeypatch.setenv("DRYDOCK_SANDBOX_NET", net)
    assert sandbox_net() == net
    assert [env.address for env in environments(net)] == [f"{net}.2", f"{net}.3", f"{net}.1"]


@pytest.mark.parametrize("net", ["10.0.0", "127.0.256", "127.0", "127.0.0.1", "127.0.0; rm -rf /", ""])
def test_sandbox_net_outside_loopback_is_refused(monkeypatch, net):
    monkeypatch.setenv("DRYDOCK_SANDBOX_NET", net)
    with pytest.raises(SandboxError, match="invalid DRYDOCK_SANDBOX_NET"):
        sandbox_net()


def test_a_shard_sandbox_whose_runner_still_runs_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(testrun, "COPIES", tmp_path)
    copy = tmp_path / f"{testrun.COPY_PREFIX}other"
    (copy / ".sandbox").mkdir(parents=True)
    (copy / ".sandbox" / "pids.json").write_text("{}")
    (copy / testrun.RUNNER_FILE).write_text(json.dumps(testrun._process(os.getpid())))
    with pytest.raises(SandboxError, match=f"a test run \\(pid {os.getpid()}\\) still uses the shard sandbox"):
        testrun.clear_leftover_shards(say=print)
    assert (copy / ".sandbox" / "pids.json").exists()


def _ended() -> dict:
    """A runner record of a process that has ended: its PID names no process now."""
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    return {"pid": ended.pid, "started": "1"}


def test_a_shard_copy_left_by_a_killed_run_is_deleted_but_not_one_in_use_kept_or_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(testrun, "COPIES", tmp_path)
    gone = _ended()
    runners = {"killed": gone, "failed": gone, "running": testrun._process(os.getpid()),
               "shard finishing": dict(gone, shard=testrun._process(os.getpid())), "no pid": {}, "junk": "{not json"}
    copies = {name: tmp_path / f"{testrun.COPY_PREFIX}{name.replace(' ', '-')}" for name in [*runners, "no runner"]}
    for name, copy in copies.items():
        (copy / "runs").mkdir(parents=True)
        if name in runners:
            runner = runners[name]
            (copy / testrun.RUNNER_FILE).write_text(runner if isinstance(runner, str) else json.dumps(runner))
    (copies["failed"] / testrun.KEPT_FILE).write_text("kept\n")
    (tmp_path / f"{testrun.COPY_PREFIX}plain-file").write_text("not a copy")
    said = []
    testrun.clear_leftover_shards(say=said.append)
    assert said == [f"deleting {copies['killed']}: a shard's copy left by an `inv test` that was stopped"]
    assert [name for name, copy in copies.items() if not copy.exists()] == ["killed"]


def test_a_shard_still_taking_its_sandbox_down_after_its_runner_was_killed_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(testrun, "COPIES", tmp_path)
    copy = tmp_path / f"{testrun.COPY_PREFIX}orphan"
    (copy / ".sandbox").mkdir(parents=True)
    (copy / ".sandbox" / "pids.json").write_text("{}")
    (copy / testrun.RUNNER_FILE).write_text(json.dumps(dict(_ended(), shard=testrun._process(os.getpid()))))
    with pytest.raises(SandboxError, match=f"a test run \\(pid {os.getpid()}\\) still uses the shard sandbox in {copy}"):
        testrun.clear_leftover_shards(say=print)
    assert (copy / ".sandbox" / "pids.json").exists()


def test_a_failed_shard_s_copy_is_marked_kept_before_its_sandbox_is_stopped(tmp_path, monkeypatch):
    """Were the stop to fail, the next run must still keep the copy's logs."""
    def down(self):
        assert (tmp_path / testrun.KEPT_FILE).exists()
        raise SandboxError("would not stop")

    monkeypatch.setattr(testrun.Sandbox, "down", down)
    (tmp_path / ".sandbox").mkdir()
    said = []
    testrun._clean_up(tmp_path, keep=True, say=said.append)
    assert (tmp_path / testrun.KEPT_FILE).exists() and said[-1].endswith("did not stop: would not stop")


def test_a_shard_copy_of_another_user_is_never_acted_on(tmp_path, monkeypatch):
    """/tmp is shared: a planted pids.json must not make `inv test` signal whatever it names."""
    import subprocess

    from drydock.sandbox import Sandbox

    monkeypatch.setattr(testrun, "COPIES", tmp_path)
    victim = subprocess.Popen(["sleep", "30"])
    try:
        copy = tmp_path / f"{testrun.COPY_PREFIX}planted"
        (copy / ".sandbox").mkdir(parents=True)
        (copy / ".sandbox" / "pids.json").write_text(json.dumps({"postgres": {"pid": victim.pid, "marker": "sleep"}}))
        real_uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # as if another user had made the copy
        testrun.clear_leftover_shards(say=print)
        assert victim.poll() is None and (copy / ".sandbox" / "pids.json").exists()
        assert not Sandbox._alive(victim.pid, "")  # an empty marker names no process
    finally:
        victim.kill()
        victim.wait()


def test_a_shard_copy_cannot_be_listed_and_keeps_what_git_does_not_track_to_its_owner(tmp_path, monkeypatch):
    import shutil
    import stat
    import subprocess

    # What another user could read while a file is copied: the copy's mode as its bytes go in.
    modes_while_copied = {}
    copy_bytes = shutil.copyfileobj

    def watched(reader, writer, *args, **kwargs):
        modes_while_copied[os.path.basename(reader.name)] = oct(stat.S_IMODE(os.fstat(writer.fileno()).st_mode))
        return copy_bytes(reader, writer, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfileobj", watched)

    root = tmp_path / "checkout"
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "test_x.py").write_text("")
    (root / ".env").write_text("SECRET=1\n")  # untracked: private only by the checkout's folder
    (root / ".venv" / "bin").mkdir(parents=True)  # ignored by git, as in drydock's .gitignore
    (root / ".venv" / "bin" / "python").write_text("")
    (root / ".gitignore").write_text(".venv/\n")
    for path in (root / "tests" / "test_x.py", root / ".env"):
        path.chmod(0o644)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "tests/test_x.py"], cwd=root, check=True)
    copy = testrun.copy_checkout(root)
    try:
        def mode(path):
            return oct(stat.S_IMODE(path.stat().st_mode))

        assert mode(copy) == ("0o711" if os.geteuid() == 0 else "0o700")
        assert (mode(copy / "tests" / "test_x.py"), mode(copy / ".env")) == ("0o644", "0o600")
        assert modes_while_copied[".env"] == "0o600", modes_while_copied
        assert (copy / ".env").read_text() == "SECRET=1\n"
        # The checkout's venv is shared, not copied nor built again by the copy's ./inv.
        assert (copy / ".venv").is_symlink() and (copy / ".venv").resolve() == (root / ".venv").resolve()
    finally:
        shutil.rmtree(copy)
    assert (root / ".venv" / "bin" / "python").exists()  # removing the copy left the venv alone


@pytest.mark.parametrize("returncode, stopped", [(-15, True), (1, False), (0, False)])
def test_the_sandbox_a_killed_checkout_shard_started_is_taken_down(tmp_path, returncode, stopped):
    """A signal that kills the checkout's pytest (a SIGKILL sent to it) leaves the sandbox it
    started; a pytest that ended by itself has taken it down already (or kept it on purpose)."""
    import subprocess
    import sys
    import time

    from drydock.sandbox import Sandbox

    marker = "drydock-test-left-running-sandbox"
    # Stopped as a "postgres-" entry is, by SIGINT. Python's own SIGINT handler only sets a flag,
    # which a sleep entered just after it ran never sees (a CI run waited out the 30 s): the
    # kernel's default action ends it wherever it is.
    server = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL);"
                                                     " print(flush=True); time.sleep(60)", marker], stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline() == b"\n"  # its SIGINT is the kernel's from here on
        while not Sandbox._alive(server.pid, marker):  # the sandbox's own check sees it
            time.sleep(0.01)
        (tmp_path / ".sandbox").mkdir()
        (tmp_path / ".sandbox" / "pids.json").write_text(json.dumps({"postgres-local": {"pid": server.pid,
                                                                                      "marker": marker}}))
        said = []
        testrun._stop_sandbox_of_killed_shard(tmp_path, returncode, say=said.append)
        assert (server.wait(timeout=10) is not None) if stopped else server.poll() is None
        assert (tmp_path / ".sandbox").exists() is not stopped
        assert bool(said) is stopped
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


# A test file for a stand-in checkout: its test waits until it is interrupted, and its
# fixture's teardown takes a moment, as a sandbox's does. A second SIGINT during that moment
# cuts it short, and then its mark is missing.
WAITING_TEST = '''
import os, pathlib, time

import pytest

MARKS, NAME = pathlib.Path(os.environ["DRYDOCK_TEST_MARKS"]), pathlib.Path(__file__).stem


@pytest.fixture
def sandbox():
    yield
    time.sleep(1.5)
    (MARKS / f"{NAME}-torn-down").touch()


def test_waits(sandbox):
    (MARKS / f"{NAME}-started").touch()
    time.sleep(300)
'''


@pytest.mark.parametrize("whole_group, shards, second", [
    (False, 1, None), (True, 1, None), (False, 2, None), (True, 2, None),
    (True, 1, "SIGINT"), (False, 2, "SIGTERM")],  # Ctrl-C pressed again; a CI cancelling the job after it
    ids=["runner-1", "group-1", "runner-2", "group-2", "group-1-twice", "runner-2-then-sigterm"])
def test_an_interrupted_run_interrupts_each_pytest_once(tmp_path, whole_group, shards, second):
    """SIGINT to `inv test` alone (kill -INT, a supervisor) once left the shards running to
    their end, and a single pytest was killed 0.25 s after Ctrl-C, in its teardown; to the
    process group (a terminal's Ctrl-C) it must not reach a pytest twice, nor may a second
    signal during the teardowns. Each pytest's teardown runs to its end, and the runner ends
    with them."""
    import signal
    import subprocess
    import sys
    import time

    checkout, marks, copies = tmp_path / "checkout", tmp_path / "marks", tmp_path / "copies"
    for folder in (checkout / "tests", marks, copies):
        folder.mkdir(parents=True)
    names = ("test_first", "test_second")
    for name in names:
        (checkout / "tests" / f"{name}.py").write_text(WAITING_TEST)
    started = names[:shards]  # one pytest runs the files in turn
    env = {key: value for key, value in os.environ.items() if key != "DRYDOCK_SANDBOX_NET"}
    env["DRYDOCK_TEST_MARKS"] = str(marks)
    runner_code = ("import sys; from pathlib import Path; from drydock import testrun;"
                   " testrun.COPIES = Path(sys.argv[2]);"  # not /tmp, where a real run's shard may be
                   " sys.exit(testrun.run(Path(sys.argv[1]), ['-p', 'no:cacheprovider'], int(sys.argv[3])))")
    with open(tmp_path / "runner.out", "w") as out:
        runner = subprocess.Popen([sys.executable, "-c", runner_code, str(checkout), str(copies), str(shards)],
                                  cwd=project_root(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((marks / f"{name}-started").exists() for name in started):
            assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "runner.out").read_text()
            time.sleep(0.1)
        for stop in (signal.SIGINT, getattr(signal, second or "SIGINT")) if second else (signal.SIGINT,):
            if whole_group:
                os.killpg(runner.pid, stop)
            else:
                runner.send_signal(stop)
            time.sleep(0.5)  # the second lands during the teardowns (1.5 s)
        runner.wait(timeout=60)  # the tests themselves would wait 300 s
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert sorted(path.name for path in marks.iterdir()) == sorted(
        f"{name}-{mark}" for name in started for mark in ("started", "torn-down")), (tmp_path / "runner.out").read_text()
