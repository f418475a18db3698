"""`inv backup`: a verified dump on the host and the controller, with a true manifest."""
import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from drydock import dumps
from drydock.paths import PG_BINDIR, backups_dir
from tests.conftest import assert_private, error_lines, inv, playbook, row_counts, sandbox_inventory_with


@pytest.fixture(scope="module")
def backup(sandbox_env):
    inv("backup", "production", check=True)
    return dumps.latest("production")


def test_controller_files_are_private(backup):
    assert_private(backup.path)


def test_sha256_matches_the_manifest(backup):
    assert hashlib.sha256(backup.path.read_bytes()).hexdigest() == backup.manifest["dump"]["sha256"]
    assert backup.path.stat().st_size == backup.manifest["dump"]["size"]


def test_pg_restore_reads_the_dump(backup):
    """As the runbook restores it by hand: zstd -dc DUMP | pg_restore."""
    assert backup.path.name.endswith(".dump.zst") and backup.manifest["dump"]["compression"] == "zstd"
    unpacked = subprocess.run(["zstd", "-dc", backup.path], capture_output=True, check=True).stdout
    assert len(unpacked) == backup.manifest["dump"]["raw_size"]
    listing = subprocess.run([PG_BINDIR / "pg_restore", "--list"], input=unpacked, capture_output=True)
    assert listing.returncode == 0
    assert b"TABLE DATA public blog_post" in listing.stdout


def test_manifest_describes_the_dumped_database(backup, connect):
    manifest = backup.manifest
    assert manifest["source"]["env"] == "production" and manifest["source"]["database"] == "wagtail_site"
    assert manifest["row_counts"] == row_counts(connect("production"))
    assert manifest["migrations"]["blog"] == "0001_initial"
    assert manifest["versions"]["server"].startswith("15")
    assert "blog_post" in manifest["write_fingerprint"]["tables"]


def test_host_keeps_a_private_copy(backup, sandbox_env, testinfra_host):
    host = testinfra_host("production")
    copy = host.file(backup.manifest["source"]["host_file"])
    assert copy.exists and copy.mode == 0o600
    assert copy.user == sandbox_env["production"]["os_user"]
    assert host.file(sandbox_env["production"]["backup_dir"]).mode == 0o700
    assert copy.sha256sum == backup.manifest["dump"]["sha256"]


def test_retention_keeps_the_newest(backup):
    inv("backup", "production", "--keep", "2", check=True)
    # What an interrupted fetch leaves: a folder without its manifest, however recent.
    unfinished = backups_dir() / "production" / "29991231T235959Z"
    unfinished.mkdir(mode=0o700)
    (unfinished / "wagtail_site-29991231T235959Z.dump.zst.partial").write_bytes(b"half a dump")
    inv("backup", "production", "--keep", "2", check=True)
    # Regular backups only: a push's safety backups live in safety/, out of this rotation.
    kept = sorted(p.name for p in (backups_dir() / "production").iterdir() if re.fullmatch(r"\d{8}T\d{6}Z", p.name))
    assert len(kept) == 2 and unfinished.name not in kept
    assert all((backups_dir() / "production" / name / "manifest.json").is_file() for name in kept)
    assert dumps.latest("production").path.parent.name == kept[-1]


def test_the_host_keeps_its_newest_dumps_only(backup, sandbox_env, testinfra_host):
    """Each backup leaves a full dump on the database host: without rotation its disk fills."""
    host = testinfra_host("production")
    folder = sandbox_env["production"]["backup_dir"]
    made = []
    for _ in range(3):
        proc = playbook("backup_database.yml", "--limit", "production", "-e", "pg_backup_host_keep=2")
        assert proc.returncode == 0, proc.stdout[-2000:]
        made.append(dumps.latest("production").manifest["source"]["host_file"])
    kept = sorted(f"{folder}/{name}" for name in host.check_output(f"ls {folder}").split()
                  if re.fullmatch(r"wagtail_site-\d{8}T\d{6}Z\.dump\.zst", name))
    assert kept == made[-2:]


def test_a_backup_never_deletes_itself(backup):
    """Rotation goes by the folders' names: one named later (a skewed clock, a copy) must not
    make the backup just taken delete itself, with --keep 1 as with more."""
    folder = backups_dir() / "production"
    planted = folder / "29991231T235959Z"
    shutil.copytree(dumps.latest("production").path.parent, planted)
    before = set(folder.iterdir())
    try:
        proc = inv("backup", "production", "--keep", "1")
        assert proc.returncode == 0, proc.stderr[-2000:]
        (made,) = set(folder.iterdir()) - before
        assert (made / "manifest.json").is_file() and dumps.load(made).path.is_file()
        assert planted.is_dir()
    finally:
        shutil.rmtree(planted)


def test_a_pull_restores_the_dump_its_own_backup_made(backup, connect):
    """A complete backup folder whose name sorts after every other (a clock set back, another
    run's) is not what `inv pull` restores: the fetch records the dump this run made."""
    planted = backups_dir() / "production" / "29991231T235959Z"
    shutil.copytree(dumps.latest("production").path.parent, planted)  # the fixture's may be rotated away
    marked = "UPDATE wagtailcore_page SET title = title || ' (after the planted backup)' WHERE id = 2"
    try:
        connect("production").execute(marked)
        inv("pull", "production", check=True)
        title = connect("local").execute("SELECT title FROM wagtailcore_page WHERE id = 2").fetchone()[0]
        assert title.endswith(" (after the planted backup)")
    finally:
        shutil.rmtree(planted)
        connect("production").execute("UPDATE wagtailcore_page SET title = replace(title, ' (after the planted backup)', '')"
                                       " WHERE id = 2")


def test_a_backup_that_would_fill_the_hosts_disk_is_refused_before_it_dumps(backup, sandbox_env, testinfra_host):
    """A dump that fills the disk a database server writes to can stop the server: refused
    before pg_dump starts, once what it may delete to make room is gone (a killed dump's
    .partial, the host's dumps beyond the newest pg_backup_host_keep - 1), leaving nothing
    new on the host or the controller. 0 turns the check off."""
    host = testinfra_host("production")
    folder = sandbox_env["production"]["backup_dir"]
    for _ in range(2):  # at least two dumps on the host
        assert playbook("backup_database.yml", "--limit", "production").returncode == 0

    def host_dumps() -> list[str]:
        return sorted(name for name in host.check_output(f"ls -A {folder}").split() if name.startswith("wagtail_site-"))

    stale = "wagtail_site-20000101T000000Z.dump.zst.partial"
    host.check_output(f"touch {folder}/{stale}")
    newest = max(name for name in host_dumps() if name.endswith(".dump.zst"))
    on_controller = sorted((backups_dir() / "production").rglob("*"))
    proc = playbook("backup_database.yml", "--limit", "production", "-e", "pg_backup_host_keep=2",
                    "-e", "pg_backup_min_free_mb=1000000000")
    assert proc.returncode != 0
    assert re.search(rf"not enough disk on this host for the dump in {folder}: [\d.]+ [KMGT]?B free, about "
                     r"[\d.]+ [KMGT]?B expected \(as big as its last dump\), and 1000000000 MB must stay free .*"
                     r"; [2-9]\d* older file\(s\) of the database were deleted to make room",
                     " ".join(proc.stdout.split())), proc.stdout[-2000:]
    assert host_dumps() == [newest]  # room made as the rotation would, and no .partial of its own
    assert sorted((backups_dir() / "production").rglob("*")) == on_controller
    unchecked = playbook("backup_database.yml", "--limit", "production", "-e", "pg_backup_min_free_mb=0")
    assert unchecked.returncode == 0, unchecked.stdout[-2000:]


def test_the_hosts_postgresql_programs_are_those_in_drydock_pg_bindir(backup, connect):
    """One inventory setting for a host on another PostgreSQL version, for the dump and the restore."""
    before = row_counts(connect("local"))
    newest = dumps.latest("production").path  # the fixture's may have been rotated away
    for args, program in ((["backup_database.yml", "--limit", "production"], "pg_dump"),
                          (["pull_database.yml", "--limit", "local", "-e", f"drydock_dump={newest}"], "pg_restore")):
        proc = playbook(*args, "-e", "drydock_pg_bindir=/nonexistent/bin")
        assert proc.returncode != 0 and f"/nonexistent/bin/{program}" in proc.stdout, proc.stdout[-2000:]
    assert row_counts(connect("local")) == before


def test_an_environment_named_apart_from_its_host_is_refused(sandbox_env):
    """drydock finds a host's dumps under backups/<its inventory name>/."""
    proc = playbook("backup_database.yml", "--limit", "production", "-e", "drydock_env=prod")
    assert proc.returncode != 0
    assert "drydock_env (prod) must be the host's inventory name (production)" in proc.stdout
    assert not (backups_dir() / "prod").exists()


@pytest.mark.parametrize("flag", ["drydock_protected", "drydock_safety_backup"])
def test_a_safety_flag_the_bool_filter_would_misread_is_refused(sandbox_env, flag):
    """`| bool` takes "y" for false: production's guards would be off for a plain playbook."""
    before = sorted((backups_dir() / "production").rglob("*"))
    proc = playbook("backup_database.yml", "--limit", "production", "-e", f"{flag}=y")
    assert proc.returncode != 0
    assert (f"{flag} of production is 'y': write true or false (the playbooks read only "
            "true/yes/on/1/false/no/off/0, and take anything else for false)") in " ".join(proc.stdout.split())
    assert sorted((backups_dir() / "production").rglob("*")) == before


def test_playbook_without_limit_is_refused_before_anything_changes(sandbox_env):
    def listing():
        return {env: sorted((backups_dir() / env).rglob("*")) for env in ("production", "staging")
                if (backups_dir() / env).exists()}

    before = listing()
    proc = playbook("backup_database.yml")
    assert proc.returncode != 0
    assert "refusing to back up 2 environments at once" in proc.stdout
    assert listing() == before


@pytest.mark.parametrize("args, message", [
    (["backup", "prod"], "unknown environment 'prod'"),
    (["backup", "production,staging"], "one environment at a time, got 2"),
    (["backup", "local"], "'local' is the local database, not a server"),
    (["backup", "production", "--keep", "0"], "invalid --keep 0: at least 1"),
    (["backup", "production", "--keep", "x"], "invalid --keep 'x': not a number"),
])
def test_bad_input_gets_one_line(sandbox_env, args, message):
    proc = inv(*args)
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 1 and message in proc.stderr


def shape_of(path) -> tuple:
    """What a folder's owner would lose: where it points, its owner, mode and files."""
    details = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(details.st_mode) else None
    return link, details.st_uid, stat.S_IMODE(details.st_mode), sorted(os.listdir(path))


@pytest.mark.parametrize("kind, reason", [("shared", "is a shared folder (mode 1777)"),
                                          ("root's, with files", "is root's and holds files"),
                                          ("a link", "is a link")])
def test_a_backup_folder_that_is_not_drydocks_to_take_is_refused_before_anything(sandbox_env, kind, reason):
    """drydock makes drydock_host_backup_dir the OS user's, 0700, as root: written as /tmp, as
    /usr/local or as a link, it would have taken a folder from everyone else."""
    if kind == "root's, with files" and os.geteuid() != 0:
        pytest.skip("the folder must be another user's than the clusters' OS user, which is this one")
    # Beside the sandbox's backup folder, where the OS user may pass (the folders on the way
    # to pytest's tmp_path are root's alone, which is refused first).
    base = Path(sandbox_env["production"]["backup_dir"]).parent / "refused-backup-folder"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755)
    try:
        folder, elsewhere = base / "folder", base / "elsewhere"
        elsewhere.mkdir(mode=0o755)
        (elsewhere / "keep").touch()
        if kind == "shared":
            folder.mkdir()
            folder.chmod(0o1777)
        elif kind == "root's, with files":
            folder.mkdir(mode=0o755)
            (folder / "keep").touch()
        else:
            folder.symlink_to(elsewhere)
        before = shape_of(folder), shape_of(elsewhere), sorted((backups_dir() / "production").rglob("*"))
        inventory = sandbox_inventory_with(base, "host_vars/production.yml", {"drydock_host_backup_dir": str(folder)})
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DRYDOCK_INVENTORY", str(inventory))
            proc = inv("backup", "production")
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"drydock_host_backup_dir {folder} {reason}" in error_lines(proc)[0], error_lines(proc)[0]
        assert (shape_of(folder), shape_of(elsewhere), sorted((backups_dir() / "production").rglob("*"))) == before
    finally:
        shutil.rmtree(base)


# What the app's role can do in its own database (it owns its public schema): plant a
# function that fits drydock's call of a built-in better than the built-in does, and would
# run with the rights of whoever calls it. Each call leaves a row saying who that was.
PLANTED = """
CREATE TABLE public.drydock_planted_calls (caller text, superuser text);
CREATE FUNCTION public.shobj_description(object oid, catalog text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.drydock_planted_calls VALUES (current_user, current_setting('is_superuser'));
    RETURN pg_catalog.shobj_description(object, catalog::name);
END $$;
"""
UNPLANT = "DROP FUNCTION IF EXISTS public.shobj_description(oid, text); DROP TABLE IF EXISTS public.drydock_planted_calls"


def test_a_function_the_apps_role_plants_never_runs_as_the_superuser(backup, connect, tmp_path):
    """drydock's modules connect as the cluster's superuser into the app's database. A backup
    refuses a database that holds a function of its own before it reads a table (the
    superuser's reads could run it). Trusted (drydock_trusted_functions), the function must
    still not be called in place of a built-in (CVE-2018-1058's pattern): a backup, a pull (its
    restore, row counts and Site update on the local copy) and a verify call only built-ins."""
    production = connect("production")
    production.execute(PLANTED)
    try:
        refused = inv("backup", "production")
        assert refused.returncode == 1 and len(error_lines(refused)) == 1
        assert error_lines(refused)[0].startswith(
            "drydock: error: production: refusing to back up wagtail_site: it holds 1 function(s), trigger(s) or rule(s) of its"
            " own (public.shobj_description(oid,text)), which the superuser's work in it could run"), refused.stderr
        inventory = sandbox_inventory_with(tmp_path, "group_vars/all.yml",
                                           {"drydock_trusted_functions": ["public.shobj_description(oid,text)"]})
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DRYDOCK_INVENTORY", str(inventory))
            inv("backup", "production", check=True)
            inv("pull", "production", "--latest", check=True)
            inv("verify", "production")  # fails: the planted table and function are drift; it ran its reads
        # The planted function itself works: called as it was meant to be caught, it records.
        production.execute("SELECT public.shobj_description(0::oid, 'pg_database'::text)")
        assert production.execute("SELECT caller, superuser FROM public.drydock_planted_calls").fetchall() == [
            ("wagtail_site", "off")]
        # The copy pulled onto the local cluster carries the function; nothing called it there either.
        assert connect("local").execute("SELECT count(*) FROM public.drydock_planted_calls").fetchone()[0] == 0
    finally:
        production.execute(UNPLANT)
        connect("local").execute(UNPLANT)
        # production's latest backup holds the planted function: the next `pull --latest` (of
        # another test file) would bring it back, as drift. A clean backup is the latest again.
        inv("backup", "production", check=True)


def test_a_table_the_apps_role_hides_in_an_extension_is_not_left_out_of_a_backup_without_a_word(backup, connect):
    """pg_dump leaves out a table an extension claims, and the database's owner may create a
    trusted extension and add its tables to it: the backup refuses the dump that lacks them,
    rather than keep one that a restore would find short when it is needed."""
    production = connect("production")
    production.execute("CREATE TABLE public.planted_hidden (id int); INSERT INTO public.planted_hidden VALUES (1);"
                       " CREATE EXTENSION tcn; ALTER EXTENSION tcn ADD TABLE public.planted_hidden")
    try:
        dumps_before = sorted((backups_dir() / "production").iterdir())
        proc = inv("backup", "production")
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:]
        assert error_lines(proc)[0].startswith(
            "drydock: error: production: the dump of wagtail_site lacks the rows of 1 table(s) (planted_hidden): pg_dump"
            " leaves out a table an extension claims"), error_lines(proc)[0]
        assert sorted((backups_dir() / "production").iterdir()) == dumps_before
    finally:
        production.execute("DROP EXTENSION IF EXISTS tcn CASCADE; DROP TABLE IF EXISTS public.planted_hidden")
