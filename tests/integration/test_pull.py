"""`inv pull`: production's dump restored into local through a side database and a swap."""
import json
import shutil
import stat
import threading
import time
from pathlib import Path

import psycopg
import pytest

from drydock import dumps
from tests.conftest import (LIVE_OID, PLANTED_SITE_RULE, PLANTED_SITE_RULE_REMOVED, database_url, databases,
                            error_lines, fingerprint, inv, playbook, row_counts, sandbox_inventory_with)


@pytest.fixture(scope="module")
def pulled(pulled):
    """This module's own pull, of the newest dump: other modules change the local database,
    and their backups rotate the session's first one away."""
    inv("pull", "production", "--latest", check=True)
    return dumps.latest("production")


def test_local_matches_the_manifest(pulled, connect):
    assert row_counts(connect("local")) == pulled.manifest["row_counts"]


def test_site_points_at_localhost(pulled, connect):
    conn = connect("local")
    assert conn.execute("SELECT hostname, port FROM wagtailcore_site WHERE is_default_site").fetchone() == (
        "localhost", 8000)
    assert conn.execute("SELECT domain FROM django_site WHERE id = 1").fetchone()[0] == "localhost:8000"


def test_a_failing_site_switch_leaves_local_unchanged(pulled, connect):
    """The Site is switched on the side database, before the swap: a failure there leaves the
    local work live (a local change tells the databases apart, as the dump may be local's)."""
    live = connect("local").execute(LIVE_OID).fetchone()
    work = "UPDATE wagtailcore_page SET title = title || ' (local work)' WHERE id = 2"
    connect("local").execute(work)
    try:
        before = fingerprint(connect("local"))
        proc = playbook("pull_database.yml", "-e", f"drydock_dump={pulled.path}", "-e", "wagtail_site_name=nosuchsite")
        assert proc.returncode != 0 and "(the local database is unchanged)" in proc.stdout, proc.stdout[-2000:]
        assert connect("local").execute(LIVE_OID).fetchone() == live
        assert fingerprint(connect("local")) == before
        assert "wagtail_site__incoming" not in databases(connect("local"))
    finally:
        connect("local").execute("UPDATE wagtailcore_page SET title = left(title, -length(' (local work)'))"
                                 " WHERE id = 2 AND title LIKE '% (local work)'")


def test_old_local_database_is_kept_and_no_side_database_is_left(pulled, connect):
    names = databases(connect("local"))
    assert "wagtail_site__snap_pre_pull" in names
    assert "wagtail_site__incoming" not in names
    # A snapshot like any other: nobody can connect to it and change it.
    assert connect("local").execute("SELECT datallowconn FROM pg_database WHERE datname = %s",
                                    ("wagtail_site__snap_pre_pull",)).fetchone() == (False,)


def test_a_pull_onto_a_local_database_dropped_by_hand_keeps_snapshot_pre_pull(pulled, connect):
    """With no live local database the swap has nothing to set aside, and snapshot pre_pull,
    the database before the pull before, stays (set aside, it was dropped with nothing in its
    place)."""
    admin = connect("local", "postgres")
    pre_pull = "SELECT oid FROM pg_database WHERE datname = 'wagtail_site__snap_pre_pull'"
    kept = admin.execute(pre_pull).fetchone()
    assert kept is not None  # the module's pull made it
    admin.execute("DROP DATABASE wagtail_site WITH (FORCE)")  # the developer's dropdb
    proc = inv("pull", "production", "--latest", check=True)
    assert "there was no local database to replace: snapshot pre_pull was left as it was" in proc.stdout
    assert admin.execute(pre_pull).fetchone() == kept
    assert row_counts(connect("local")) == pulled.manifest["row_counts"]
    assert not {name for name in databases(admin) if name.endswith(("__old", "__incoming"))}


def test_pre_pull_snapshot_lists_its_age(pulled):
    """The swap notes when it set the old local database aside: its age, not '?'."""
    listing = inv("snapshot.list", check=True).stdout.splitlines()
    row = next(line for line in listing if line.split()[:1] == ["pre_pull"])
    assert row.split()[5] in ("min", "h"), row  # '?' shifts the columns: [5] is then the ready copy


def test_second_pull_of_the_latest_dump_named_by_its_manifest(pulled, connect):
    conn = connect("local")
    conn.execute("DELETE FROM taggit_taggeditem")  # local work that the pull must replace
    manifest = dumps.latest("production").path.parent / "manifest.json"
    proc = inv("pull", "production", "--dump", str(manifest))  # the manifest stands for its dump
    assert proc.returncode == 0, proc.stderr
    assert row_counts(connect("local")) == dumps.latest("production").manifest["row_counts"]


def test_gzip_dump_restores_as_it_is(pulled, connect, tmp_path):
    """pg_backup_compression: gzip is pg_dump's own compression, as in the dumps made before
    zstd: a .dump that the host restores without unpacking it."""
    proc = playbook("backup_database.yml", "--limit", "production", "-e", "pg_backup_compression=gzip",
                    "-e", f"pg_backup_controller_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-2000:]
    dump = dumps.latest("production", root=tmp_path)
    assert dump.path.name.endswith(".dump") and dump.manifest["dump"]["compression"] == "gzip"
    connect("local").execute("DELETE FROM taggit_taggeditem")
    inv("pull", "production", "--dump", str(dump.path.parent), check=True)  # a backup folder stands for its dump
    assert row_counts(connect("local")) == dump.manifest["row_counts"]


def corrupt_copy(dump, tmp_path, how: str):
    folder = tmp_path / dump.path.parent.name
    shutil.copytree(dump.path.parent, folder)
    target = folder / dump.path.name
    data = bytearray(target.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped byte in the middle of the data
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("how", ["truncated", "flipped byte"])
def test_damaged_dump_is_refused_and_local_is_unchanged(pulled, connect, tmp_path, how, sandbox_env):
    before = fingerprint(connect("local"))
    damaged = corrupt_copy(pulled, tmp_path, how)
    proc = inv("pull", "production", "--dump", str(damaged))
    assert proc.returncode == 1
    assert "sha256" in error_lines(proc)[-1] and "local database is unchanged" in error_lines(proc)[-1]
    assert fingerprint(connect("local")) == before
    assert "wagtail_site__incoming" not in databases(connect("local"))


@pytest.mark.parametrize("lie, expected", [({"blog_post": 1}, "blog_post"), ({"ghost_table": 5}, "ghost_table: missing")],
                         ids=["a count off by one", "a table the dump lacks"])
def test_count_mismatch_after_restore_leaves_local_unchanged(pulled, connect, sandbox_env, tmp_path, lie, expected):
    """A dump that restores but does not hold what its manifest says never goes live, and
    the unpacked archive it was restored from (a full copy of the data) is not left behind."""
    folder = tmp_path / "lying"
    shutil.copytree(pulled.path.parent, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for table, more in lie.items():
        manifest["row_counts"][table] = manifest["row_counts"].get(table, 0) + more
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = fingerprint(connect("local"))
    proc = inv("pull", "production", "--dump", str(folder / pulled.path.name))
    assert proc.returncode == 1
    assert expected in error_lines(proc)[-1]
    assert fingerprint(connect("local")) == before
    assert "wagtail_site__incoming" not in databases(connect("local"))
    incoming = Path(sandbox_env["local"]["backup_dir"]) / "incoming"
    assert stat.S_IMODE(incoming.stat().st_mode) == 0o700 and not list(incoming.iterdir())


def test_a_restore_the_disk_has_no_room_for_is_refused_before_it_starts(pulled, connect):
    before = fingerprint(connect("local"))
    proc = playbook("pull_database.yml", "-e", f"drydock_dump={pulled.path}", "-e", "pg_restore_disk_margin=1000000")
    assert proc.returncode != 0
    assert "not enough disk for the restore: " in proc.stdout and "(the database is restored beside the live one: its size × pg_restore_disk_margin)" in \
        " ".join(proc.stdout.split()), proc.stdout[-2000:]
    assert fingerprint(connect("local")) == before
    assert "wagtail_site__incoming" not in databases(connect("local", "postgres"))


@pytest.mark.parametrize("setting, to_whom", [
    ("ansible_shell_allow_world_readable_temp=true", "every user (allow_world_readable_tmpfiles)"),
    ("ansible_common_remote_group=postgres", "the group postgres (common_remote_group)")])
def test_a_dump_ansible_would_share_with_others_on_the_host_is_never_uploaded(pulled, connect, setting, to_whom):
    """Becoming postgres without setfacl or chown, Ansible would make the upload readable to a
    group or to everyone, as these settings allow; drydock refuses before the upload."""
    before = fingerprint(connect("local"))
    uploads = set(Path("/var/tmp").glob("ansible-tmp-*/drydock-upload.dump"))
    proc = playbook("pull_database.yml", "-e", f"drydock_dump={pulled.path}", "-e", setting)
    assert proc.returncode != 0
    assert (f"refusing to upload a dump that Ansible is set to make readable to {to_whom} when it cannot give it to"
            " postgres alone: unset that setting for these hosts") in " ".join(proc.stdout.split()), proc.stdout[-2000:]
    assert fingerprint(connect("local")) == before
    assert "wagtail_site__incoming" not in databases(connect("local", "postgres"))
    assert set(Path("/var/tmp").glob("ansible-tmp-*/drydock-upload.dump")) == uploads


@pytest.mark.parametrize("override", ["pg_restore_incoming=wagtail_site", "pg_restore_previous=wagtail_site",
                                      "pg_restore_incoming=wagtail_site__snap_pre_pull"])
def test_side_database_named_as_the_live_one_is_refused(pulled, connect, override):
    """The side database is dropped before the restore and the previous one replaced by the
    swap: a setting that names either after the live database, or both alike, must stop
    before either (the last would drop the kept database, pre_pull, to restore into it)."""
    before = fingerprint(connect("local"))
    oids = "SELECT datname, oid FROM pg_database WHERE datname LIKE 'wagtail_site%' ORDER BY datname"
    databases_before = connect("local", "postgres").execute(oids).fetchall()
    assert ("wagtail_site__snap_pre_pull",) in [(name,) for name, _ in databases_before]
    proc = playbook("pull_database.yml", "-e", f"drydock_dump={pulled.path}", "-e", override)
    assert proc.returncode != 0
    assert "named apart from the live one and from each other" in proc.stdout + proc.stderr
    assert fingerprint(connect("local")) == before
    assert connect("local", "postgres").execute(oids).fetchall() == databases_before


@pytest.mark.parametrize("args, message", [
    (["pull", "production", "--dump", "/nonexistent/x.dump"], "no such dump file"),
    (["pull", "production", "--dump", "/"], "no dump file in the folder /"),
    (["pull", "prod"], "unknown environment"),
    (["pull", "production,staging"], "one environment at a time"),
    (["pull", "local"], "'local' is the local database, not a server"),
    (["pull", "production", "--latest", "--dump", "/x.dump"], "not both"),
    (["push", "staging", "--allow-unscrubbed"], "--allow-unscrubbed applies to a --dump only"),
    (["migrate", "--plan", "--fixtree"], "--plan shows every pending migration and runs nothing"),
    (["migrate", "--plan", "--phase", "before"], "--plan shows every pending migration and runs nothing"),
    (["migrate", "--plan", "--no-migrate"], "--plan shows every pending migration and runs nothing"),
    (["migrate", "--no-migrate"], "--no-migrate leaves nothing to run: give it a --notebook, a --script or --fixtree"),
    (["migrate", "--no-migrate", "--fixtree", "--phase", "before"], "--phase before chooses the migrations to apply,"
                                                                     " and --no-migrate applies none: give one of the two"),
    (["migrate", "--param", "title=x"], "--param sets a notebook's parameters: give --notebook with it"),
    (["pipeline", "production", "staging", "--param", "title=x"], "--param sets a notebook's parameters"),
    (["migrate", "--plan", "--notebook", "examples/notebooks/blog_to_podcast.ipynb"], "--plan shows every pending"),
    # `--dump "$DUMP"` with DUMP unset: never taken as no --dump (a push would dump the local database).
    (["push", "production", "--yes", "--dump", ""], "--dump was given an empty path"),
    (["pull", "production", "--dump", " "], "--dump was given an empty path"),
    (["migrate", "--notebook", ""], "--notebook was given an empty path"),
    (["verify", "staging", "--manifest", ""], "--manifest was given an empty path"),
    (["verify", "staging", "--manifest", "README.md"], "README.md is not a drydock manifest (or an incomplete one): it has no row counts"),
    (["migrate", "--notebook", "examples/notebooks/blog_to_podcast.ipynb", "--param", "database_url=postgresql:///other"],
     "--param database_url is set by drydock"),
    (["migrate", "--notebook", "examples/notebooks/blog_to_podcast.ipynb", "--param", "n=1", "--param", "n=2"],
     "--param n is given twice"),
])
def test_bad_input_gets_one_line(sandbox_env, args, message):
    proc = inv(*args)
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and message in proc.stderr


def test_a_link_in_place_of_the_archive_folder_hands_root_nothing(pulled, connect, sandbox_env):
    """The OS user owns the backup folder, so it can put a link where the archive's folder
    goes. Root must not follow it (it would make any folder the OS user's, 0700): the folder
    is made and the archive written as the OS user, and a link there is refused outright."""
    import os
    import tempfile

    victim = Path(tempfile.mkdtemp(prefix="drydock-victim-", dir="/tmp"))  # ours: root's in CI, as /etc is
    victim.chmod(0o755)
    incoming = Path(sandbox_env["local"]["backup_dir"]) / "incoming"
    aside = incoming.with_name("incoming.aside")
    if incoming.exists():
        incoming.rename(aside)
    before = fingerprint(connect("local"))
    try:
        incoming.symlink_to(victim)
        proc = inv("pull", "production", "--latest")
        assert proc.returncode == 1
        assert error_lines(proc)[-1] == (f"drydock: error: local: cannot use {incoming} for pg_restore's archive: it is"
                                         " a link: remove it, and the next run makes the folder (the local database is unchanged)")
        mode = victim.stat()  # its owner (root in CI), its mode and its emptiness as they were
        assert (mode.st_uid, stat.S_IMODE(mode.st_mode)) == (os.getuid(), 0o755) and not list(victim.iterdir())
        assert fingerprint(connect("local")) == before
    finally:
        if incoming.is_symlink():
            incoming.unlink()
        if aside.exists():
            aside.rename(incoming)
        shutil.rmtree(victim)
    inv("pull", "production", "--latest", check=True)  # the real folder again
    assert stat.S_IMODE(os.stat(incoming).st_mode) == 0o700


# A function the app's role plants, as a compromised app could: each call writes on itself
# who ran it (a comment, not a row: the restore checks its row counts).
PLANTED_FUNCTION = """
CREATE FUNCTION public.planted_ok(int) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN RESET ROLE; EXECUTE format('COMMENT ON FUNCTION public.planted_ok(int) IS %L', current_user); RETURN true; END $$"""
CALLED_BY = "SELECT obj_description('public.planted_ok(int)'::regprocedure)"
PLANTED = {  # a CHECK constraint on blog_post calling it; one calling PostgreSQL's set_config()
    "function of its own": f"{PLANTED_FUNCTION}; ALTER TABLE public.blog_post ADD CONSTRAINT planted_check"
                           " CHECK (public.planted_ok(page_ptr_id))",
    "volatile built-in": "ALTER TABLE public.blog_post ADD CONSTRAINT planted_check"
                         " CHECK (set_config('application_name', 'planted', false) IS NOT NULL)",
}
REFUSAL = {
    "function of its own": "drydock: error: local: refusing to restore a dump that brings 1 function(s), trigger(s) or rule(s) of"
                           " its own (public.planted_ok(integer)): the superuser's sessions (pg_restore's, drydock's) could run"
                           " them, and a Django/Wagtail database has none;",
    "volatile built-in": "drydock: error: local: refusing to load the dump's rows: constraint planted_check on"
                         " public.blog_post calls set_config(text,text,boolean): a function that is not PostgreSQL's"
                         " own immutable one would run as each row is loaded, in a session that logged in as the"
                         " superuser;",
}


def trusting_production(tmp_path: Path, function: str) -> Path:
    """An inventory: the sandbox's, with production alone trusting `function`."""
    return sandbox_inventory_with(tmp_path, "host_vars/production.yml", {"drydock_trusted_functions": [function]})


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_a_dump_whose_code_the_superuser_would_run_is_refused_before_its_rows(pulled, connect, planted, tmp_path):
    """What the app's role plants on production travels in the dump, and pg_restore logs in as
    the superuser, only setting the app's role. A function of the database's own is refused by
    the backup, and, trusted there, by the restore, before anything is created (the
    superuser's sessions could run it in more ways than a check can see); a CHECK constraint
    calling one of PostgreSQL's that is not immutable, before any row is loaded. Trusted by the
    restore too, the planted function runs, and shows what it would have done."""
    production = connect("production")
    production.execute(PLANTED[planted])  # as the app's role
    before = fingerprint(connect("local"))
    try:
        if planted == "function of its own":
            refused = inv("pull", "production")
            assert refused.returncode == 1 and error_lines(refused)[0].startswith(
                "drydock: error: production: refusing to back up wagtail_site: it holds 1 function(s), trigger(s) or rule(s) of"
                " its own (public.planted_ok(integer)), which the superuser's work in it could run"), refused.stderr
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("DRYDOCK_INVENTORY", str(trusting_production(tmp_path, "public.planted_ok(integer)")))
                inv("backup", "production", check=True)
            proc = inv("pull", "production", "--latest")
        else:
            proc = inv("pull", "production")
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:]
        assert error_lines(proc)[0].startswith(REFUSAL[planted]), error_lines(proc)[0]
        assert error_lines(proc)[0].endswith("(the local database is unchanged)")
        assert fingerprint(connect("local")) == before
        assert "wagtail_site__incoming" not in databases(connect("local", "postgres"))
        if planted == "function of its own":
            assert production.execute(CALLED_BY).fetchone() == ("wagtail_site",)  # it ran on production, as itself
            trusted = playbook("pull_database.yml", "-e", f"drydock_dump={dumps.latest('production').path}",
                               "-e", json.dumps({"drydock_trusted_functions": ["public.planted_ok(integer)"]}))
            assert trusted.returncode == 0, trusted.stdout[-2000:]
            assert connect("local").execute(CALLED_BY).fetchone() == ("postgres",)  # as the superuser
    finally:
        production.execute("ALTER TABLE public.blog_post DROP CONSTRAINT IF EXISTS planted_check;"
                           " DROP FUNCTION IF EXISTS public.planted_ok(int)")
        inv("pull", "production", check=True)  # the newest backup, and the local database, without them


# PLANTED_SITE_RULE on production: the pull's Site switch on the local copy would run it.
RULE = "rule planted on public.wagtailcore_site"


def test_a_rule_on_production_is_refused_by_its_backup_and_by_the_restore(pulled, connect, tmp_path):
    """The backup refuses a rule of the database's own; trusted on production, the restore
    refuses it before creating anything. Trusted by the local host too, the pull's Site switch
    runs it: the superuser reads the file the app's role may not."""
    production = connect("production")
    production.execute(PLANTED_SITE_RULE)
    before = fingerprint(connect("local"))
    try:
        refused = inv("pull", "production")
        assert refused.returncode == 1 and error_lines(refused)[0].startswith(
            "drydock: error: production: refusing to back up wagtail_site: it holds 1 function(s), trigger(s) or rule(s) of its"
            f" own ({RULE}), which the superuser's work in it could run"), refused.stderr
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DRYDOCK_INVENTORY", str(trusting_production(tmp_path, RULE)))
            inv("backup", "production", check=True)
        proc = inv("pull", "production", "--latest")
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:]
        assert error_lines(proc)[0].startswith("drydock: error: local: refusing to restore a dump that brings 1"
                                               f" function(s), trigger(s) or rule(s) of its own ({RULE}):"), error_lines(proc)[0]
        assert fingerprint(connect("local")) == before
        assert "wagtail_site__incoming" not in databases(connect("local", "postgres"))
        trusted = playbook("pull_database.yml", "-e", f"drydock_dump={dumps.latest('production').path}",
                           "-e", json.dumps({"drydock_trusted_functions": [RULE]}))
        assert trusted.returncode == 0, trusted.stdout[-2000:]
        assert connect("local").execute("SELECT line FROM public.planted_loot").fetchall() == [
            (Path("/etc/hostname").read_text(),)]
    finally:
        production.execute(PLANTED_SITE_RULE_REMOVED)
        inv("pull", "production", check=True)  # the newest backup, and the local database, without it


# The public schema's tables and indexes: 0 and 0 in a side database just created.
SCHEMA_SIZE = ("SELECT count(*) FILTER (WHERE relkind = 'r'), count(*) FILTER (WHERE relkind = 'i') FROM pg_class"
               " WHERE relnamespace = 'public'::regnamespace")


def test_the_apps_role_cannot_connect_to_the_side_database_before_its_restore_is_checked(pulled, connect, sandbox_env):
    """Were it let in between the check of the schema and the load of the rows, it could add
    code that the load runs as the superuser. A session of the app's role knocking all
    through a pull gets in only once the copy is whole (it leaves at once: a session that
    stays would hold up the swap)."""
    url, seen, stop = database_url(sandbox_env, "local", "wagtail_site__incoming"), [], threading.Event()

    def knock() -> None:
        while not stop.is_set() and not seen:
            try:
                with psycopg.connect(url, connect_timeout=5) as side:
                    seen.append(side.execute(SCHEMA_SIZE).fetchone())
            except psycopg.Error:
                time.sleep(0.005)

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        inv("pull", "production", "--latest", check=True)
    finally:
        stop.set()
        knocker.join()
    assert seen == [connect("local").execute(SCHEMA_SIZE).fetchone()]


PUBLIC_SCHEMA = ("SELECT obj_description(oid, 'pg_namespace'), nspacl::text, nspowner::regrole::text FROM pg_namespace"
                 " WHERE nspname = 'public'")


def test_the_public_schemas_comment_and_grants_arrive_as_the_app_role_set_them(pulled, connect):
    """The restore runs as the app's role in a side database the superuser owns until it is
    checked: the role owns its public schema meanwhile, so that the dump's COMMENT ON SCHEMA
    public and its REVOKEs there apply (not owning it, pg_restore fails on the one, and only
    warns on the others, leaving the schema open to every role)."""
    production = connect("production")
    production.execute("COMMENT ON SCHEMA public IS 'the site''s tables'; REVOKE USAGE ON SCHEMA public FROM PUBLIC")
    try:
        inv("pull", "production", check=True)
        assert connect("local").execute(PUBLIC_SCHEMA).fetchone() == production.execute(PUBLIC_SCHEMA).fetchone()
        assert connect("local").execute(PUBLIC_SCHEMA).fetchone()[2] == "pg_database_owner"
    finally:
        production.execute("COMMENT ON SCHEMA public IS 'standard public schema'; GRANT USAGE ON SCHEMA public TO PUBLIC")
        inv("pull", "production", check=True)  # the newest backup, and the local database, without them
