"""The fault matrix: a pull and a push killed (SIGKILL) at each of their steps, damaged
dumps, a dump from a newer pg_dump, a target without the app role, and the SSH connection
dropped during the upload. For each: the live database keeps its exact content (a push's
swap that the host finishes after the controller died leaves it, unchanged, as
`__previous`: never a mix), the error is one line (a killed run prints none: the journal,
which `inv runs.list` shows, says that it was killed and in which step), nothing is left
behind (side databases, locks, partial files) once the next run has gone through, and that
next run succeeds."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

import drydock_pg
from drydock import dumps, journal
from drydock.lock import process_start, stat_fields
from drydock.paths import backups_dir, runs_dir
from drydock.playbook import ansible_env
from drydock.sandbox import child_pids
from tests.conftest import (INV, ROOT, app_serves, as_cluster_owner, databases, error_lines, fingerprint, inv,
                            owner_sql, process_tree, sandbox_inventory_with)

# sftp -l: bandwidth in Kbit/s. At 100 KB/s a transfer of the small sandbox's dump lasts
# long enough to be interrupted in the middle.
SLOW_SFTP = {"ANSIBLE_SFTP_EXTRA_ARGS": "-l 800"}
SIDE_SUFFIXES = ("__incoming", "__outgoing", "__swapping", "__old")


# -- helpers ------------------------------------------------------------------------------
def run_started(folder: Path) -> float:
    return journal.began(folder).timestamp()


def started_tasks(since: float) -> list[str]:
    """The names (without their role) of the tasks Ansible started in the runs begun after
    `since`, from the progress drydock_progress records: Ansible's log shows a task only with
    its first result, at its end, and these tests act at its start."""
    progress = (journal.read_progress(p) or [] for p in journal.run_folders() if run_started(p) >= since)
    return [entry["task"].split(" : ", 1)[-1] for entries in progress for entry in entries
            if entry.get("event") == "start"]


def task_started(task: str, since: float) -> Callable[[], bool]:
    """True once Ansible has started a task whose name begins with `task`."""
    return lambda: any(name.startswith(task) for name in started_tasks(since))


def kill_when(args: list[str], condition: Callable[[], bool], env: dict | None = None, timeout: float = 180,
              keep_tree: bool = False) -> set[tuple[int, str]]:
    """Start `inv ARGS` in its own process group and SIGKILL the group as soon as
    `condition()` holds (ansible-playbook, in a session of its own, then gets SIGTERM from
    the kernel and stops what it runs: drydock.playbook). With `keep_tree`, returns the
    processes the run had at that moment, its modules among them, for wait_until_gone."""
    killed: set[tuple[int, str]] = set()
    # Killed, ansible-playbook leaves its own temporary folder (a cache of modules, half a MB)
    # where it was told to: here, not under ~/.ansible/tmp, run after run.
    with tempfile.TemporaryDirectory(prefix="drydock-killed-") as ansible_local_temp:
        proc = subprocess.Popen([*INV, *args],
                                env=dict(ansible_env(), ANSIBLE_LOCAL_TEMP=ansible_local_temp, **(env or {})),
                                cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                assert proc.poll() is None, f"inv {' '.join(args)} ended before the step to interrupt"
                assert time.monotonic() < deadline, f"inv {' '.join(args)} did not reach the step in {timeout} s"
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                if keep_tree:
                    killed = process_tree(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return killed


def host_dir(sandbox_env: dict, env: str) -> Path:
    return Path(sandbox_env[env]["backup_dir"])


class PartialDump:
    """True once a dump being written shows on `env`'s host; keeps the modes it had then:
    production data from its first byte, not only once it is renamed."""

    def __init__(self, sandbox_env: dict, env: str):
        self.folder = host_dir(sandbox_env, env)
        self.modes: list[int] = []

    def __call__(self) -> bool:
        for partial in self.folder.glob("*.partial"):
            try:
                self.modes.append(stat.S_IMODE(partial.stat().st_mode))
            except FileNotFoundError:  # renamed meanwhile: the dump was done
                continue
        return bool(self.modes)


def assert_private_archive_left(sandbox_env: dict, env: str) -> None:
    """A run killed during its restore leaves the archive pg_restore was reading (the next run
    replaces it): production data, so 0600 like every dump."""
    archive = host_dir(sandbox_env, env) / "incoming" / "wagtail_site__incoming.dump"
    assert archive.exists() and stat.S_IMODE(archive.stat().st_mode) == 0o600


def uploads(since: float) -> list[tuple[Path, int]]:
    """The uploads of runs begun after `since`, each with the size of the dump it is (the
    start of), in Ansible's temporary folder on the host: under /var/tmp when Ansible becomes
    an unprivileged user (the sandbox's hosts), else the SSH user's own. Another shard's
    sandbox shares those folders and may be uploading at the same moment: this run's upload
    is the start of the dump it fetched to backups/local/."""
    fetched = [dump for dump in (backups_dir() / "local").glob("*/*.dump.zst") if dump.stat().st_mtime >= since]

    def start(path: Path, size: int) -> bytes:
        with path.open("rb") as handle:
            return handle.read(size)

    found = []
    for parent in (Path("/var/tmp"), Path.home() / ".ansible" / "tmp"):
        for upload in parent.glob("ansible-tmp-*/drydock-upload.dump"):
            try:
                if upload.stat().st_mtime < since or not (head := start(upload, 1 << 20)):
                    continue
            except FileNotFoundError:  # checked and moved on meanwhile
                continue
            found += [(upload, dump.stat().st_size) for dump in fetched if start(dump, len(head)) == head]
    return found


def size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # moved or removed meanwhile
        return 0


def upload_under_way(since: float) -> Callable[[], bool]:
    """True once this run's upload has begun on the host and is not complete: the kill lands
    in the middle of the transfer, not in the check after it."""
    return lambda: any(0 < size_or_zero(upload) < size for upload, size in uploads(since))


def fetch_under_way(env: str, since: float) -> Callable[[], bool]:
    """True once a fetch from `env` has begun writing its dump on the controller (sftp writes
    it out only at the end: the file stays empty while the transfer lasts)."""
    def begun(partial: Path) -> bool:
        try:
            return partial.stat().st_mtime >= since
        except FileNotFoundError:  # renamed meanwhile: the fetch was done
            return False
    return lambda: any(begun(partial) for partial in backups_dir().glob(f"{env}/*/*.partial"))


def upload_left_behind(since: float) -> Path:
    """The upload of a run killed during it: a part of the dump, not all of it."""
    left = uploads(since)
    assert len(left) == 1, f"uploads left since the kill: {left}"
    upload, size = left[0]
    assert upload.stat().st_size < size, "the upload was complete: the kill did not land during it"
    return upload


def assert_killed_during(task: str, step: str, since: float) -> str:
    """A SIGKILLed run prints nothing: `inv runs.list` says that it was killed, and in which
    step (which also shows that the kill landed where the test meant it to). Its id."""
    runs = [run for run in journal.list_runs() if run["task"] == task and run_started(Path(run["id"])) >= since]
    assert len(runs) == 1, runs
    assert (runs[0]["outcome"], runs[0]["failed_step"]) == ("killed", step), runs[0]
    assert runs[0]["error"] == f"the run ended during {step} without finishing it (killed?)"
    return runs[0]["id"]


def assert_no_strays(connect, sandbox_env: dict) -> None:
    for env in ("production", "staging", "local"):
        side = {name for name in databases(connect(env, "postgres")) if name.endswith(SIDE_SUFFIXES)}
        assert not side, f"side databases left on {env}: {side}"
        folder = host_dir(sandbox_env, env)
        assert not list(folder.rglob("*.partial")), f"partial dumps left on {env}"
        assert not list((folder / "incoming").glob("*")), f"uploads left on {env}"
    assert not list((runs_dir() / "locks").glob("*.lock")), "a lock was left behind"
    unfinished = [folder for folder in backups_dir().glob("**/????????T??????Z")
                  if folder.is_dir() and not (folder / "manifest.json").exists()]
    assert not unfinished, f"backups without a manifest: {unfinished}"


def next_run_succeeds(*args: str) -> subprocess.CompletedProcess:
    proc = inv(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def scrubbed_local_dump():
    """The newest dump of the local database made for staging (scrubbed)."""
    for manifest in sorted((backups_dir() / "local").glob("*/manifest.json"), reverse=True):
        dump = dumps.load(dumps.in_folder(manifest.parent))
        if dump.manifest["scrubbed"]:
            return dump
    raise AssertionError("no scrubbed local dump: push to staging first")


def next_push_of_the_local_dump_succeeds() -> None:
    """The next push after a fault on staging's side: of the newest scrubbed local dump (the
    one the failed run made, or had a damaged copy of), as `inv push staging --dump`, which
    skips dumping the local database again (that side had no fault, and it takes seconds)."""
    next_run_succeeds("push", "staging", "--dump", str(scrubbed_local_dump().path))


def zstd(args: list[str], data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", *args], input=data, capture_output=True, check=True).stdout


def edited_copy(dump, tmp_path: Path, edit: Callable[[bytearray], None], fix_checksum: bool,
                unpacked: bool = False) -> Path:
    """A copy of `dump` (with its manifest) edited in place, or with `unpacked` the archive
    inside its zstd compression; with `fix_checksum` the manifest is updated to the edited
    bytes, so that only pg_restore can notice."""
    folder = tmp_path / dump.path.parent.name
    shutil.copytree(dump.path.parent, folder)
    target = folder / dump.path.name
    data = bytearray(target.read_bytes())
    if unpacked:
        assert target.suffix == ".zst"
        data = bytearray(zstd(["-dc"], bytes(data)))
        edit(data)
        data = bytearray(zstd(["-1", "-c"], bytes(data)))
    else:
        edit(data)
    target.write_bytes(bytes(data))
    if fix_checksum:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["dump"]["sha256"] = hashlib.sha256(data).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return target


# -- SIGKILL at each step -------------------------------------------------------------------
class BlockedSwap:
    """Hold a lock, from a session on another database (which the swap does not end), that a
    statement of the swap's module waits for, so that a kill lands while that module runs:
    taken once the side database exists, released (rolled back) by `release`.
    - "comment": COMMENT ON DATABASE <db>__incoming, which the module writes its record on
      before its renames (drydock_db_swap): a lock on the database as an object. Taken once
      the app's role owns the side database (the restore hands it over once it is checked).
    - "rename": an uncommitted update of the live database's row in pg_database (its
      connection limit, set to what it is), which the rename of that database, inside the
      swap's transaction and once its sessions were ended, waits for: a lock on our
      transaction (drydock_pg.renames_in_one_transaction)."""

    HOLD = {"comment": ("COMMENT ON DATABASE wagtail_site__incoming IS NULL", "object"),
            "rename": ("ALTER DATABASE wagtail_site CONNECTION LIMIT -1", "transactionid")}

    def __init__(self, connect, env: str, at: str = "comment"):
        self.watcher = connect(env, "postgres")
        self.holder = connect(env, "postgres", autocommit=False)
        self.statement, self.locktype = self.HOLD[at]
        self.holding = False

    def waiting(self) -> bool:
        if not self.holding:
            if "wagtail_site__incoming" not in databases(self.watcher):
                return False
            if self.statement.startswith("COMMENT") and not self.watcher.execute(
                    "SELECT EXISTS (SELECT FROM pg_database WHERE datname = 'wagtail_site__incoming'"
                    " AND datdba = current_user::regrole)").fetchone()[0]:
                return False
            self.holder.execute(self.statement)
            self.holding = True
        # drydock's modules name their sessions; the app role may not read their queries.
        return self.watcher.execute(
            "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) WHERE NOT granted AND locktype = %s"
            " AND application_name = 'drydock'", (self.locktype,)).fetchone()[0] > 0

    def release(self) -> None:
        self.holder.rollback()


def restoring(connect, env: str, since: float) -> Callable[[], bool]:
    """True once the restore's task has begun and its side database exists on `env`
    (the module creates it first). One connection for all the polls: a new one every
    10 ms would use up the server's connection slots."""
    watcher = connect(env, "postgres")
    return lambda: (task_started("Restore into the side database (stop", since)()
                    and "wagtail_site__incoming" in databases(watcher))


def change_a_post(conn, note: str) -> None:
    """Write to `conn`'s database, so that a run that should have been stopped but went
    through would show in the fingerprint of the database it copies to."""
    conn.execute("UPDATE blog_post SET body = body || %s WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)",
                 (f"<p>{note}</p>",))


def wait_until_gone(processes: set[tuple[int, str]], timeout: float = 60) -> None:
    """Wait until none of a killed run's `processes` (kill_when's) runs: its modules too,
    which are piped into Python, with no file to know them by."""
    def running(pid: int, start: str) -> bool:
        fields = stat_fields(pid)  # a zombie has ended: only its parent's wait is left
        return bool(fields) and fields[0] != "Z" and process_start(pid) == start

    deadline = time.monotonic() + timeout
    while left := [pid for pid, start in processes if running(pid, start)]:
        assert time.monotonic() < deadline, f"processes {left} of the killed run still run {timeout} s after the kill"
        time.sleep(0.05)


@pytest.mark.parametrize("step", ["dump", "fetch", "restore", "swap"])
def test_pull_killed_at_each_step(pulled, connect, sandbox_env, step):
    change_a_post(connect("production"), f"pull killed at {step}")
    before = fingerprint(connect("local"))
    since = time.time()
    blocked = BlockedSwap(connect, "local")
    conditions = {
        "dump": PartialDump(sandbox_env, "production"),
        "fetch": fetch_under_way("production", since),
        "restore": restoring(connect, "local", since),
        "swap": blocked.waiting,
    }
    try:
        killed = kill_when(["pull", "production"], conditions[step], env=SLOW_SFTP if step == "fetch" else None,
                           keep_tree=step == "swap")
        if step == "swap":  # the swap waits on our lock: released only once its module is gone
            assert killed, "no process of the pull was found to wait for"
            wait_until_gone(killed)
    finally:
        blocked.release()
    assert fingerprint(connect("local")) == before
    assert_killed_during("pull", "backup" if step in ("dump", "fetch") else "pull", since)
    if step == "dump":
        assert set(conditions["dump"].modes) == {0o600}
    if step == "fetch":  # cut off during the transfer: the backup's folder has no manifest
        folders = [path for path in backups_dir().glob("production/*") if path.stat().st_mtime >= since]
        assert folders and not [path for path in folders if (path / "manifest.json").exists()], folders
    if step == "restore":
        assert_private_archive_left(sandbox_env, "local")
    proc = next_run_succeeds("pull", "production")
    locked = "production" if step in ("dump", "fetch") else "local"  # the backup locks its source
    assert f"clearing a stale lock on {locked}" in proc.stdout
    assert fingerprint(connect("local")) != before  # the change made above arrived
    assert_no_strays(connect, sandbox_env)


def drydock_sessions_ended(conn, timeout: float = 60) -> None:
    """Wait until no module of drydock's has a session on `conn`'s server: over SSH, a module
    the killed controller started runs on to its end on the host."""
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'drydock'").fetchone()[0]:
        assert time.monotonic() < deadline, f"drydock's sessions still open {timeout} s after the kill"
        time.sleep(0.05)


@pytest.mark.parametrize("step", ["dump", "fetch", "upload", "restore", "app stop", "swap"])
def test_push_killed_at_each_step(staging_at_the_local_schema, connect, sandbox_env, step):
    change_a_post(connect("local"), f"push killed at {step}")
    before = fingerprint(connect("staging"))
    watcher = connect("staging", "postgres")
    old_live = drydock_pg.database_oid(watcher, "wagtail_site")
    assert old_live is not None
    since = time.time()
    blocked = BlockedSwap(connect, "staging", at="rename")
    conditions = {
        "dump": PartialDump(sandbox_env, "local"),
        # The local host is reached without SSH: its fetch is a file copy of milliseconds,
        # and the kill lands as it starts.
        "fetch": task_started("Fetch the dump", since),
        "upload": upload_under_way(since),
        "restore": restoring(connect, "staging", since),
        "app stop": task_started("Stop the app with its stop command", since),
        "swap": blocked.waiting,
    }
    incoming = None
    try:
        killed = kill_when(["push", "staging"], conditions[step], env=SLOW_SFTP if step == "upload" else None,
                           keep_tree=step == "swap")
        if step == "swap":  # the swap's rename waits on our lock, its transaction open
            assert killed, "no process of the push was found to wait for"
            incoming = drydock_pg.database_oid(watcher, "wagtail_site__incoming")
            wait_until_gone(killed)
    finally:
        blocked.release()
    run_id = assert_killed_during("push", "dump local" if step in ("dump", "fetch") else "restore", since)
    # What `inv runs.show` says the killed push left on staging, from the tasks Ansible reported.
    stopped = "; its app may be stopped: `inv app.restart staging`"
    left = {"upload": "the swap did not run: staging runs the database it ran before this run",
            "restore": "the swap did not run: staging runs the database it ran before this run",
            "app stop": f"the swap did not run: staging runs the database it ran before this run{stopped}",
            "swap": "the swap was running when the run ended: `inv verify staging` says which database is live"
                    f"{stopped}"}
    shown = [line for line in inv("runs.show", run_id, check=True).stdout.splitlines() if line.startswith("staging: ")]
    assert shown == ([f"staging: {left[step]}"] if step in left else []), shown
    if step == "swap":
        # Over SSH the swap's module runs on the host, out of the dead controller's reach: let
        # go, it commits there, or ends with its connection. Either way staging runs a whole
        # database: the one from before, unchanged, or the restored copy, with the one from
        # before kept unchanged as wagtail_site__previous (never a mix).
        drydock_sessions_ended(watcher)
        live = drydock_pg.database_oid(watcher, "wagtail_site")
        assert live in (old_live, incoming), (live, old_live, incoming)
        if live != old_live:
            assert drydock_pg.database_oid(watcher, "wagtail_site__previous") == old_live
            before_now = fingerprint(connect("staging", "wagtail_site__previous"))
        else:
            before_now = fingerprint(connect("staging"))
        assert before_now == before
    else:
        assert drydock_pg.database_oid(watcher, "wagtail_site") == old_live
        assert fingerprint(connect("staging")) == before
    if step == "dump":
        assert set(conditions["dump"].modes) == {0o600}
    if step == "restore":
        assert_private_archive_left(sandbox_env, "staging")
    if step == "upload":
        # A dump no run reads again: a run an hour later or more deletes it (made that old here).
        upload = upload_left_behind(since)
        assert stat.S_IMODE(upload.parent.stat().st_mode) == 0o700
        os.utime(upload, (since - 3700, since - 3700))
    proc = next_run_succeeds("push", "staging")
    assert "clearing a stale lock on staging" in proc.stdout
    assert fingerprint(connect("staging")) != before  # the change made above arrived
    assert_no_strays(connect, sandbox_env)
    if step == "upload":
        assert not upload.parent.exists()
    # The app runs again, even after a kill while it was stopped.
    assert app_serves(sandbox_env, "staging")


# -- damaged and unreadable dumps, a target without the app role -------------------------------
@pytest.mark.parametrize("how", ["truncated", "flipped byte", "flipped byte, then checksummed",
                                 "truncated, then checksummed", "not zstd, then checksummed"])
def test_damaged_dump_is_refused_by_the_push(staging_at_the_local_schema, connect, sandbox_env, tmp_path, how):
    def damage(data: bytearray) -> None:
        if how.startswith("truncated"):
            del data[len(data) // 2:]
        elif how.startswith("not zstd"):  # pg_restore --list, reading through zstd, gets nothing
            data[:] = bytes(len(data))
        else:  # past the table of contents, which pg_restore --list reads first
            data[len(data) * 9 // 10] ^= 0xFF

    change_a_post(connect("staging"), f"damaged dump: {how}")  # a copy swapped in would lack it
    before = fingerprint(connect("staging"))
    checksummed = how.endswith("checksummed")  # damaged before the manifest was written, as a bad disk would
    proc = inv("push", "staging", "--dump", str(edited_copy(scrubbed_local_dump(), tmp_path, damage, checksummed)))
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    if checksummed:
        # zstd's words depend on where the byte lands: a checksum that fails, a corrupted block…
        line = error_lines(proc)[0]
        assert ": it does not unpack (zstd: " in line and "), though its sha256 is the manifest's: " in line, line
        assert "(zstd: /" not in line, line  # not the name of the file it was uploaded to, which is gone
        assert error_lines(proc)[0].endswith("it was damaged before its manifest was written (the live database is unchanged)")
    else:
        assert "sha256" in error_lines(proc)[0] and "truncated or corrupted" in error_lines(proc)[0]
    assert fingerprint(connect("staging")) == before
    assert_no_strays(connect, sandbox_env)
    next_push_of_the_local_dump_succeeds()
    assert_no_strays(connect, sandbox_env)


def test_dump_from_a_newer_pg_dump_is_refused(staging_at_the_local_schema, connect, sandbox_env, tmp_path):
    def newer_archive_version(data: bytearray) -> None:
        assert data[:5] == b"PGDMP"
        data[6] += 10  # the archive's minor version: bytes 5, 6, 7 are major, minor, revision

    change_a_post(connect("staging"), "newer pg_dump")
    before = fingerprint(connect("staging"))
    dump = edited_copy(scrubbed_local_dump(), tmp_path, newer_archive_version, True, unpacked=True)
    proc = inv("push", "staging", "--dump", str(dump))
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert "pg_restore cannot read" in error_lines(proc)[0] and "unsupported version" in error_lines(proc)[0]
    assert fingerprint(connect("staging")) == before
    assert_no_strays(connect, sandbox_env)
    next_push_of_the_local_dump_succeeds()
    assert_no_strays(connect, sandbox_env)


def test_target_without_the_app_role_is_refused_before_any_change(staging_at_the_local_schema, connect, sandbox_env,
                                                                  tmp_path):
    """Through `inv push`, with staging told of a role its server lacks: the sandbox's
    inventory, and a host_vars file beside it that Ansible reads over the script's variables."""
    inventory = sandbox_inventory_with(tmp_path, "host_vars/staging.yml", {"drydock_db_app_role": "no_such_role"})
    change_a_post(connect("staging"), "no app role")
    before = fingerprint(connect("staging"))
    since = time.time()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRYDOCK_INVENTORY", str(inventory))
        proc = inv("push", "staging", "--dump", str(scrubbed_local_dump().path))
    assert proc.returncode == 1 and error_lines(proc) == [
        "drydock: error: staging: the app role no_such_role does not exist on this server: create it first (it owns "
        "everything restored) (the live database is unchanged)"]
    assert not task_started("Restore into the side database", since)(), "the restore began"
    assert fingerprint(connect("staging")) == before
    assert_no_strays(connect, sandbox_env)
    next_push_of_the_local_dump_succeeds()
    assert_no_strays(connect, sandbox_env)


def stop_cluster(sandbox_env: dict, env: str) -> None:
    """Stop `env`'s sandbox cluster at once, as a crash would (./inv sandbox.up starts it again)."""
    cluster = sandbox_env[env]
    pg_ctl = [str(Path(cluster["pg_bindir"]) / "pg_ctl"), "stop", "-m", "immediate", "-D", str(ROOT / f".sandbox/{env}/data")]
    subprocess.run(as_cluster_owner(cluster, pg_ctl),
                   check=True, capture_output=True)


def test_a_stopped_server_is_named_in_one_line_and_nothing_changes(staging_at_the_local_schema, connect, sandbox_env):
    """With staging's server down, every command that reaches it says so in drydock's words
    (not libpq's "connection is bad", not Ansible's "Unknown error" of a failed ping) and
    what to do; with the local one down, a push says so (its outgoing copy's drop fails in
    the same words), and so does a migration step, whose app cannot reach it, and a verify of
    staging, whose reference schema is built on the local cluster, names local as the host
    that failed. Once they are up again, staging is as it was."""
    before = fingerprint(connect("staging"))

    def down_line(env: str) -> str:
        socket = f"{sandbox_env[env]['socket_dir']}/.s.PGSQL.{sandbox_env[env]['port']}"
        return (f"drydock: error: {env}: no database server answers on {socket} (No such file or directory): start it,"
                " or set drydock_db_socket_dir and drydock_db_port to its own")

    stop_cluster(sandbox_env, "local")
    try:
        assert error_lines(inv("push", "staging"))[-1] == down_line("local")
        # The migration step's first connection is the app's own, over TCP.
        local = sandbox_env["local"]
        assert error_lines(inv("migrate"))[-1] == (
            f'drydock: error: local: the app cannot reach its database: no database server answers on {local["host"]}:'
            f'{local["port"]} (Connection refused): start it, or point the host and port of drydock_app_database_url at it')
        assert error_lines(inv("verify", "staging"))[-1] == down_line("local").replace(
            "error: local: ", "error: staging (on local): ", 1)
    finally:
        inv("sandbox.up", check=True)
    down = down_line("staging")
    stop_cluster(sandbox_env, "staging")
    try:
        assert error_lines(inv("verify", "staging"))[-1] == down
        # Refused before its restore made anything: no side database of its own to drop.
        assert error_lines(inv("push", "staging"))[-1] == down + " (the live database is unchanged)"
        assert error_lines(inv("app.restart", "staging"))[-1] == down.replace(
            "staging: ", "staging: the app's database wagtail_site does not answer: ", 1)
    finally:
        inv("sandbox.up", check=True)
    assert fingerprint(connect("staging")) == before
    next_run_succeeds("app.restart", "staging")
    assert app_serves(sandbox_env, "staging")
    assert_no_strays(connect, sandbox_env)


def test_a_server_that_stops_during_the_restore_is_named_not_the_clean_up(pulled, connect, sandbox_env):
    """The local server goes down while a pull restores into it: the line gives the restore's
    failure, not the clean-up's (whose drop fails too), and says what is left; once the
    server is up again (./inv sandbox.up starts it), the next pull clears it."""
    before = fingerprint(connect("local"))
    since = time.time()
    reached = restoring(connect, "local", since)
    proc = subprocess.Popen([*INV, "pull", "production", "--latest"],
                            env=ansible_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not reached():
            assert proc.poll() is None and time.monotonic() < deadline, "the pull never reached its restore"
            time.sleep(0.01)
        stop_cluster(sandbox_env, "local")
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        inv("sandbox.up", check=True)
    line = [line for line in err.splitlines() if line.strip()][-1]
    assert proc.returncode == 1 and line.startswith("drydock: error: local: "), err[-2000:]
    failure, _, left = line.partition(" (the local database is unchanged; ")
    assert "unable to connect" not in failure and "drop" not in failure, line  # the restore's own words
    assert left.startswith("wagtail_site__incoming could not be dropped (") and left.endswith(
        "): the next run drops it)"), line
    assert fingerprint(connect("local")) == before
    next_run_succeeds("pull", "production", "--latest")
    assert_no_strays(connect, sandbox_env)


# -- the network --------------------------------------------------------------------------------
def test_a_side_database_another_run_replaced_is_never_swapped_in(staging_at_the_local_schema, connect, sandbox_env):
    """Two controllers pushing to one server at once: drydock's locks are each controller's
    own, and both restore into <db>__incoming. Here the other run's copy, half-restored (an
    empty database), takes that name once this run has restored and checked its own: this
    run must not swap it in, and says why. (Seen by hand before the swap knew the oid of the
    database it restored: the push reported success with staging running a half-restored
    copy.)"""
    staging = connect("staging", "postgres")
    before = fingerprint(connect("staging"))
    oids = {name: drydock_pg.database_oid(staging, name) for name in ("wagtail_site", "wagtail_site__previous")}
    other_runs = []

    def replace_the_side_database() -> None:
        owner_sql(sandbox_env["staging"], "postgres", "DROP DATABASE wagtail_site__incoming WITH (FORCE)",
                  "CREATE DATABASE wagtail_site__incoming OWNER wagtail_site")
        other_runs.append(drydock_pg.database_oid(staging, "wagtail_site__incoming"))

    returncode, line = paused_at(["push", "staging"], "Stop the app", replace_the_side_database)
    assert returncode == 1
    assert ("refusing to swap in wagtail_site__incoming: it is no longer the database this run restored and checked "
            "(another run restoring onto this server replaced it)") in line
    assert "the live database is unchanged" in line
    assert {name: drydock_pg.database_oid(staging, name) for name in oids} == oids
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")
    # Its clean-up left the other run's side database alone, which the next run then drops.
    assert [drydock_pg.database_oid(staging, "wagtail_site__incoming")] == other_runs
    next_push_of_the_local_dump_succeeds()
    assert_no_strays(connect, sandbox_env)


def paused_at(args: list[str], at_task: str, meanwhile: Callable[[], None]) -> tuple[int, str]:
    """Run `inv ARGS`; once it starts the task `at_task`, pause all its processes
    (ansible-playbook's and its modules' among them) while `meanwhile()` runs; its exit code
    and last line."""
    since = time.time()
    proc = subprocess.Popen([*INV, *args],
                            env=ansible_env(), cwd=ROOT, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not task_started(at_task, since)():
            assert proc.poll() is None and time.monotonic() < deadline, f"the run never reached {at_task!r}"
            time.sleep(0.01)
        paused = []
        try:
            for pid, _start in process_tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):  # one that just ended
                    os.kill(pid, signal.SIGSTOP)
                    paused.append(pid)
            meanwhile()
        finally:  # never left stopped: a stopped ansible-playbook would not end with the run
            for pid in paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, (stderr.strip().splitlines() or [""])[-1]


@pytest.mark.parametrize("command", ["push", "rollback"])
def test_a_write_between_the_count_and_the_swap_is_swapped_back_in_not_set_aside(command, connect, sandbox_env):
    """A client other than the app (a worker, cron, an admin) writes to production after the
    last count of its writes, before the swap (here, while the push reads the copy's counters,
    or the rollback checks its count). The swap sets that write aside with the database it
    replaces: the run must notice, swap it back in and say so. (Seen by a review before the
    count after the swap: both succeeded, the write left in wagtail_site__previous, which the
    next push drops.)"""
    inv("pull", "production", check=True)  # a fresh backup: the copy is based on it
    if command == "rollback":
        inv("push", "production", "--yes", check=True)  # something to roll back to
    marker = f"written between the count and the swap {time.time()}"
    at_task = ("Read the side database's write counters" if command == "push"
               else "Refuse a rollback that would set those writes aside")
    def write_to_production() -> None:  # a client other than the app
        writer = connect("production")
        writer.execute("UPDATE blog_post SET body = body || %s WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)",
                       (marker,))
        writer.close()  # as the swap would end it: its counters are sent as it exits

    try:
        returncode, line = paused_at([command, "production", "--yes"], at_task, write_to_production)
        assert returncode == 1, line
        assert "production took writes after its check, before the swap (blog_post (+1)), which it set aside" in line, line
        assert ("swapped back: production runs the database it ran before" in line) == (command == "rollback"), line
        live = connect("production")
        assert live.execute("SELECT count(*) FROM blog_post WHERE body LIKE %s", (f"%{marker}",)).fetchone()[0] == 1
        assert app_serves(sandbox_env, "production")
        assert_no_strays(connect, sandbox_env)
    finally:  # the next pushes to production count their writes from a backup that holds this one
        inv("backup", "production", check=True)


def test_the_swaps_renames_are_undone_unless_they_put_the_restored_database_live(connect):
    """The swap's last check, inside its transaction, after the renames have locked the
    database: the test above stops at the check before it."""
    admin = connect("local", "postgres")
    side, live = "drydock_test_side", "drydock_test_live"
    for name in (side, live):
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {side}")
    try:
        oid = drydock_pg.database_oid(admin, side)
        with pytest.raises(drydock_pg.NotTheRestoredDatabase):
            drydock_pg.renames_in_one_transaction(admin, [side], [(side, live)], expect=[(live, oid + 1)])
        assert drydock_pg.database_oid(admin, side) == oid and drydock_pg.database_oid(admin, live) is None
        drydock_pg.renames_in_one_transaction(admin, [side], [(side, live)], expect=[(live, oid)])
        assert drydock_pg.database_oid(admin, live) == oid and drydock_pg.database_oid(admin, side) is None
    finally:
        for name in (side, live):
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# hand_over() of the restore module, run as Ansible runs it: as the cluster's owner, with
# drydock_pg as ansible.module_utils.drydock_pg. The other run's statements (argv[5]) come where
# argv[6] says: "before" the hand-over, or "between" its two steps (the public schema taken
# back, the database not yet given). Exits 3 when the hand-over refuses the database.
HAND_OVER = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
import drydock_pg
sys.modules["ansible.module_utils.drydock_pg"] = drydock_pg
spec = importlib.util.spec_from_file_location("drydock_pg_restore", sys.argv[2])
restore = importlib.util.module_from_spec(spec)
spec.loader.exec_module(restore)
params, oid, other_run, when = json.loads(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6]

def replace():
    with drydock_pg.connect(params["socket_dir"], params["port"], "postgres", autocommit=True) as conn:
        for statement in other_run:
            conn.execute(statement)

if when == "before":
    replace()
elif when == "between":
    take_back = restore.lend_to_the_restore
    def take_back_then_replace(*args, **kwargs):
        take_back(*args, **kwargs)
        replace()
    restore.lend_to_the_restore = take_back_then_replace
try:
    restore.hand_over(params, oid)
except drydock_pg.NotTheRestoredDatabase:
    sys.exit(3)
"""


@pytest.mark.parametrize("when", ["before", "between"])
def test_the_hand_over_gives_the_app_role_only_the_database_this_run_restored(when, connect, sandbox_env):
    """The restore hands its side database to the app's role only once it is checked. Another
    run restoring onto the same server may have replaced it under its name by then, with its
    own, not yet checked: that one must stay the superuser's, closed to other roles, whether it
    was replaced before the hand-over or between its two steps (there, the ownership it just
    gave is taken back with the transaction)."""
    server = sandbox_env["local"]
    side = "drydock_test_hand_over"
    create = [f"CREATE DATABASE {side} TEMPLATE template0", f"REVOKE ALL ON DATABASE {side} FROM PUBLIC"]
    other_run = [f"DROP DATABASE {side}", *create]

    def state() -> tuple:
        return (owner_sql(server, "postgres", f"SELECT oid, datdba::regrole, datacl FROM pg_database WHERE datname = '{side}'"),
                owner_sql(server, side, "SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'public'"))

    def hand_over(oid: int, when: str) -> int:  # its exit code
        params = {"socket_dir": server["socket_dir"], "port": server["port"], "database": side,
                  "owner": server["app_role"]}
        argv = [sys.executable, "-c", HAND_OVER, str(ROOT / "module_utils"), str(ROOT / "library" / "drydock_pg_restore.py"),
                json.dumps(params), str(oid), json.dumps(other_run), when]
        return subprocess.run(as_cluster_owner(server, argv), capture_output=True, text=True).returncode

    superuser, app_role = server["os_user"], server["app_role"]
    owner_sql(server, "postgres", f"DROP DATABASE IF EXISTS {side}", *create)
    try:
        owner_sql(server, side, f"ALTER SCHEMA public OWNER TO {app_role}")  # lent, as pg_restore left it
        ours = drydock_pg.database_oid(connect("local", "postgres"), side)
        assert hand_over(ours, when) == 3
        theirs, public_owner = state()
        theirs_oid, *owner_and_grants = theirs.split("|")
        assert int(theirs_oid) != ours
        assert (owner_and_grants, public_owner) == ([superuser, f"{{{superuser}=CTc/{superuser}}}"], "pg_database_owner")
        # The other run, handing over its own: the app's role owns it, with the default grants.
        assert hand_over(int(theirs_oid), "never") == 0
        assert state() == (f"{theirs_oid}|{app_role}|", "pg_database_owner")
    finally:
        owner_sql(server, "postgres", f"DROP DATABASE IF EXISTS {side}")


def test_ssh_dropped_during_upload(staging_at_the_local_schema, connect, sandbox_env):
    sandbox = ROOT / ".sandbox"
    # A failure, not a skip: without sshd this fault of the matrix would go untested unseen.
    if json.loads((sandbox / "connection.json").read_text())["connection"] != "ssh":
        pytest.fail("the sandbox reaches its hosts without SSH, so a dropped connection cannot be tested: "
                    "install openssh-server (and leave DRYDOCK_SANDBOX_SSH unset), then ./inv sandbox.down")
    listener = json.loads((sandbox / "pids.json").read_text())["sshd-staging"]["pid"]
    change_a_post(connect("staging"), "ssh dropped")  # a copy swapped in would lack it
    before = fingerprint(connect("staging"))
    since = time.time()
    # Once the network is gone, Ansible tries the transfer again in other ways, each new
    # connection waiting out the SSH timeout (10 s by default): 3 s is plenty on loopback.
    proc = subprocess.Popen([*INV, "push", "staging"],
                            env=dict(ansible_env(), **SLOW_SFTP, ANSIBLE_TIMEOUT="3"),
                            cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not task_started("Upload the dump", since)():
        assert proc.poll() is None and time.monotonic() < deadline, "the push never reached its upload"
        time.sleep(0.01)
    time.sleep(0.5)
    # The network is gone: staging's sshd takes no new connection (Ansible would retry the
    # transfer with scp), and every connection it serves is cut.
    os.kill(listener, signal.SIGSTOP)
    try:
        for pid in child_pids(listener):
            os.kill(pid, signal.SIGKILL)
        _out, err = proc.communicate(timeout=300)
    finally:
        os.kill(listener, signal.SIGCONT)
    # Ansible's own warnings about the failed transfer stream before it; drydock's error is one line.
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("drydock: error: staging: "), err
    assert [line for line in lines if line.startswith("drydock:")] == lines[-1:]
    # Ansible's message names no task, and the playbook's rescue does not run for a host that
    # does not answer: drydock says where it was, and what the push left, from its progress.
    assert lines[-1].startswith('drydock: error: staging: the host did not answer during the task "Upload the dump '
                                'and check it'), lines[-1]
    assert "Failed to connect to the host via ssh" in lines[-1]
    assert lines[-1].endswith("; the swap did not run: staging runs its old database, and its app was not left "
                              "stopped; the next push drops any side database left behind"), lines[-1]
    assert fingerprint(connect("staging")) == before
    assert_no_strays(connect, sandbox_env)
    next_push_of_the_local_dump_succeeds()
    assert_no_strays(connect, sandbox_env)

