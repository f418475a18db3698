"""`inv push` / `inv rollback`: the migrated copy onto a server, safely, and back."""
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

from drydock import dumps
from drydock.paths import backups_dir, runs_dir
from drydock.playbook import ansible_env
from tests.conftest import (LIVE_OID, INV, ROOT, app_serves, assert_private, connector, database_settings, database_url,
                            databases, error_lines, fingerprint, inv, owner_psql, playbook, row_counts, run_module,
                            server_own_settings)

# A check broken on purpose (a bogus health URL, a database that is not there) fails on the
# database a swap-back brings back too, the same way: the line adds this, without quoting the
# error a second time.
FAILED_AGAIN = ("the app failed its health check again once swapped back, with the same error:"
                " inv app.restart staging once the cause is fixed)")
# A push's swap-back puts back the generation its swap kept (there is one after the fixture's push).
BEFORE_THIS_PUSH = ("wagtail_site__previous is again the one from before this push, and the copy that failed is kept"
                    " as wagtail_site__previous__old until the next push")
PAGE_TREE_OK = """SELECT (SELECT count(*) FROM wagtailcore_page WHERE depth <> length(path) / 4)
     + (SELECT count(*) FROM wagtailcore_page p WHERE numchild <>
          (SELECT count(*) FROM wagtailcore_page c WHERE c.path LIKE p.path || '____')) = 0"""


def as_db_owner(server: dict, sql: str, database: str = "postgres") -> str:
    """A shell command running `sql` as the cluster's owner (owner_psql)."""
    return shlex.join([*owner_psql(server, database), "-c", sql])


@pytest.fixture(scope="module")
def pushed(pulled, connect_module, sandbox_env):
    """Staging's content before, and the manifest of the copy pushed onto it."""
    inv("pull", "production", "--latest", check=True)
    # A signed-in user's session, which must not leave this machine (the sessions rule).
    connect_module("local").execute("INSERT INTO django_session (session_key, session_data, expire_date)"
                                    " VALUES ('drydock-test-session', 'signed-in', now() + interval '1 day')")
    # What Wagtail's user views and Django's admin log of a user: its username (the log rules).
    user_type = "(SELECT id FROM django_content_type WHERE app_label = 'auth' AND model = 'user')"
    connect_module("local").execute(
        "INSERT INTO wagtailcore_modellogentry (label, action, data, timestamp, content_changed, deleted, object_id,"
        f" content_type_id) SELECT username, 'wagtail.edit', '{{}}', now(), true, false, id, {user_type} FROM auth_user;"
        " INSERT INTO django_admin_log (action_time, object_id, object_repr, action_flag, change_message,"
        f" content_type_id, user_id) SELECT now(), id, username, 2, '[]', {user_type}, id FROM auth_user")
    before = fingerprint(connect_module("staging"))
    inv("push", "staging", "--allow-older-schema", check=True)  # whatever schema an earlier module left there
    yield before, dumps.latest("local")
    # The copy the last failed push below kept aside (the next push would drop it): not left to other modules.
    subprocess.run(["/bin/sh", "-c", as_db_owner(sandbox_env["staging"], "DROP DATABASE IF EXISTS wagtail_site__previous__old")],
                   check=True)


@pytest.fixture(scope="module")
def connect_module(sandbox_env):
    with connector(sandbox_env) as _connect:
        yield _connect


def test_staging_holds_the_pushed_copy(pushed, connect):
    _before, manifest_dump = pushed
    conn = connect("staging")
    assert row_counts(conn) == manifest_dump.manifest["row_counts"]
    assert conn.execute(PAGE_TREE_OK).fetchone()[0]
    assert conn.execute("SELECT hostname, port FROM wagtailcore_site WHERE is_default_site").fetchone() == (
        "staging.drydock-example.org", 443)
    assert "wagtail_site__previous" in databases(conn)
    assert "wagtail_site__incoming" not in databases(conn)


def test_restored_long_values_are_lz4_compressed(pushed, connect):
    """The restore's sessions use lz4 for TOAST (pg_restore_toast_compression)."""
    lz4, pglz = connect("staging").execute(
        "SELECT count(*) FILTER (WHERE c = 'lz4'), count(*) FILTER (WHERE c = 'pglz')"
        " FROM (SELECT pg_column_compression(content) AS c FROM wagtailcore_revision) AS values").fetchone()
    assert lz4 > 0 and pglz == 0


def test_staging_push_keeps_the_replaced_database_but_takes_no_file_backup(pushed, connect):
    from drydock import journal

    assert "wagtail_site__previous" in databases(connect("staging", "postgres"))
    newest_push = sorted(runs_dir().glob("*-push"))[-1]
    restore = next(step for step in journal.read(newest_push) if step["step"] == "restore")
    assert restore["outcome"] == "ok" and restore["safety_backup"] is None


def test_the_default_user_names_rule_survives_a_username_it_would_give(connect):
    """Usernames are unique row by row: renaming id 3 to user-3 fails while another user is
    called that, unless the rule first moves every name out of the way."""
    import yaml

    rules = yaml.safe_load((ROOT / "roles/pg_scrub/defaults/main.yml").read_text())["pg_scrub_rules"]
    conn = connect("local", autocommit=False)
    try:  # a temporary auth_user, found before the real one, rolled back
        conn.execute("CREATE TEMP TABLE auth_user (id int PRIMARY KEY, username varchar(150) UNIQUE,"
                     " first_name text, last_name text)")
        conn.execute("INSERT INTO auth_user VALUES (3, 'bob', 'Bob', 'Jones'), (7, 'user-3', 'Ann', 'Smith')")
        conn.execute(next(rule for rule in rules if rule["name"] == "user_names")["sql"])
        assert conn.execute("SELECT id, username, first_name, last_name FROM auth_user ORDER BY id").fetchall() == [
            (3, "user-3", "", ""), (7, "user-7", "", "")]
    finally:
        conn.rollback()


@contextmanager
def app_owned_database(sandbox_env, name: str):
    """A scratch database on local's server, owned by the app's role, as its connection; dropped after."""
    local = sandbox_env["local"]
    subprocess.run([*owner_psql(local), "-c", f"CREATE DATABASE {name} OWNER {local['app_role']}"], check=True)
    try:
        with psycopg.connect(database_url(sandbox_env, "local", name), autocommit=True) as conn:
            yield conn
    finally:
        subprocess.run([*owner_psql(local), "-c", f"DROP DATABASE {name} WITH (FORCE)"], check=True)


def test_the_scrub_rules_write_the_apps_tables_not_a_schema_named_after_the_superuser(sandbox_env):
    """As the superuser, "$user" on the search path is a schema named after it (postgres),
    which the app's role (the database's owner) can create: an auth_user of its own there must
    not take the rules' writes while public.auth_user leaves unscrubbed."""
    import yaml

    rules = yaml.safe_load((ROOT / "roles/pg_scrub/defaults/main.yml").read_text())["pg_scrub_rules"]
    scratch, local = "drydock_test_scrub_decoy", sandbox_env["local"]
    with app_owned_database(sandbox_env, scratch) as conn:
        decoy = f'"{local["os_user"]}".auth_user'  # the cluster's superuser is its OS user
        conn.execute(f'CREATE TABLE public.django_migrations (id int); CREATE SCHEMA "{local["os_user"]}";'
                     " CREATE TABLE public.auth_user (id int, email text);"
                     f" CREATE TABLE {decoy} (LIKE public.auth_user);"
                     " INSERT INTO public.auth_user VALUES (1, 'ada@drydock-example.org');"
                     f" INSERT INTO {decoy} VALUES (1, 'decoy@drydock-example.org')")
        result = run_module("local", "drydock_scrub",
                            {"database": scratch, "rules": [r for r in rules if r["name"] == "user_emails"]})
        assert result["ran"] == [{"name": "user_emails", "rows": 1}]
        assert conn.execute("TABLE public.auth_user").fetchall() == [(1, "user1@example.invalid")]
        assert conn.execute(f"TABLE {decoy}").fetchall() == [(1, "decoy@drydock-example.org")]


def test_a_view_a_scrub_rule_reads_that_would_run_a_volatile_function_refuses_the_scrub(sandbox_env):
    """A scrub rule may read other tables than the one it writes (the log rules read
    django_content_type), and a view standing there runs its functions as the reader, the
    superuser: the scrub refuses before any rule runs."""
    scratch = "drydock_test_scrub_view"
    with app_owned_database(sandbox_env, scratch) as conn:
        conn.execute("CREATE TABLE public.django_migrations (id int);"
                     " CREATE TABLE public.auth_user (id int, email text);"
                     " INSERT INTO public.auth_user VALUES (1, 'ada@drydock-example.org');"
                     " CREATE VIEW public.django_content_type AS SELECT 1 AS id"
                     " WHERE set_config('application_name', 'planted', false) IS NOT NULL")
        rule = {"name": "emails_of_typed_users", "table": "auth_user",
                "sql": "UPDATE auth_user SET email = 'x@example.invalid' WHERE id IN (SELECT id FROM django_content_type)"}
        result = run_module("local", "drydock_scrub", {"database": scratch, "rules": [rule]}, fails=True)
        assert result["msg"].startswith(
            f"refusing to scrub {scratch}: view public.django_content_type calls set_config(text,text,boolean):"
            " a function that is not PostgreSQL's own immutable one would run as the superuser writes a row,"
            " or reads a view;"), result["msg"]
        assert conn.execute("TABLE public.auth_user").fetchall() == [(1, "ada@drydock-example.org")]


def test_staging_copy_is_scrubbed(pushed, connect):
    emails = [e for (e,) in connect("staging").execute("SELECT email FROM auth_user")]
    assert emails and all(e.endswith("@example.invalid") for e in emails), emails
    users = connect("staging").execute("SELECT id, username, first_name, last_name FROM auth_user").fetchall()
    assert users and all((name, first, last) == (f"user-{id_}", "", "") for id_, name, first, last in users), users
    assert set(pushed[1].manifest["scrubbed"]) >= {"user_emails", "user_names", "user_passwords", "sessions"}
    # Recorded as run for whoever audits the push, though one rule's table is missing here
    # (form submissions): a result's `skipped` key would make Ansible call the task skipped.
    from drydock.journal import read_progress
    newest_push = sorted(runs_dir().glob("*-push"))[-1]
    assert [e["event"] for e in read_progress(newest_push) if e.get("action") == "drydock_scrub"] == ["start", "ok"]
    # Passwords made unusable ('!' is Django's mark for that), sessions gone.
    local_hashes = {h for (h,) in connect("local").execute("SELECT password FROM auth_user")}
    staging_hashes = [h for (h,) in connect("staging").execute("SELECT password FROM auth_user")]
    assert staging_hashes and all(h.startswith("!") for h in staging_hashes) and not local_hashes & set(staging_hashes)
    assert connect("staging").execute("SELECT count(*) FROM django_session").fetchone()[0] == 0
    # The usernames the logs keep of users are gone too.
    for log in ("SELECT object_id, label FROM wagtailcore_modellogentry", "SELECT object_id, object_repr FROM django_admin_log"):
        entries = connect("staging").execute(log).fetchall()
        assert entries and all(label == f"user-{id_}" for id_, label in entries), entries
    # the local database itself keeps its data
    assert any(e.endswith("@drydock-example.org") for (e,) in connect("local").execute("SELECT email FROM auth_user"))
    assert any(h.startswith("pbkdf2_") for h in local_hashes)
    assert connect("local").execute("SELECT count(*) FROM django_session").fetchone()[0] == 1


def test_the_pushed_dump_is_private_on_the_controller(pushed):
    """The local database's dumps reach backups/local/ by the local connection, not sftp,
    which would carry the host file's 0600 across."""
    assert_private(pushed[1].path)


def test_the_app_serves_the_pushed_database(pushed, sandbox_env):

    assert app_serves(sandbox_env, "staging")


def test_rollback_brings_back_exactly_the_old_content(pushed, connect):
    before, _dump = pushed
    try:
        inv("rollback", "staging", check=True)
        assert fingerprint(connect("staging")) == before
    finally:
        inv("rollback", "staging", check=True)  # forward again, for the tests after this one


def test_a_rollback_whose_health_check_fails_swaps_back(pushed, connect, sandbox_env):
    """The database a rollback brings back may be one the app cannot run on (a pushed copy
    that failed its check and was swapped back out): it does not stay live."""
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    before = fingerprint(connect("staging"))
    proc = playbook("rollback_database.yml", "--limit", "staging",
                    "-e", f"drydock_app_health_url=http://{sandbox_env['staging']['host']}:8000/no-such-page",
                    "-e", "app_service_health_timeout=2")
    assert proc.returncode != 0
    # The check itself is broken here: it fails on the database swapped back too, and the line says so.
    assert ("(swapped back: staging runs the database it ran before the rollback again; the one that failed the check"
            f" is kept as wagtail_site__previous; {FAILED_AGAIN}") in " ".join(proc.stdout.split()), proc.stdout[-3000:]
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_a_rollback_whose_app_will_not_start_swaps_back(pushed, connect, sandbox_env, tmp_path):
    """A database the app cannot run on often shows as a failed start, not a failed health
    check: the rollback swaps back all the same (here the start fails once, on the database
    brought back)."""
    service = ROOT / ".sandbox" / "staging" / "app-service"
    failed_once = tmp_path / "failed-once"
    start = ["/bin/sh", "-c", f"if [ ! -e {failed_once} ]; then touch {failed_once};"
                              f" echo 'the app refused this database' >&2; exit 1; fi; exec {service} start"]
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    before = fingerprint(connect("staging"))
    # The test above swapped the kept database back out as it failed its check: brought back knowingly.
    proc = playbook("rollback_database.yml", "--limit", "staging", "-e", "drydock_allow_failed_check=true",
                    "-e", json.dumps({"drydock_app_start_command": start}))
    assert proc.returncode != 0
    assert "(swapped back: staging runs the database it ran before the rollback again" in proc.stdout, proc.stdout[-3000:]
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_verify_says_which_database_is_live_and_where_it_came_from(pushed, connect):
    """After a push, and after a rollback and its reverse: `inv verify` names the pushed dump
    and the backup it copies on whichever database is live (the other is `previous`)."""
    _before, dump = pushed
    pushed_copy = (f"pushed from local's dump {dump.manifest['created']}"
                   f" (a copy of production's backup {dump.manifest['lineage']['created']})")
    oid = connect("staging", "postgres").execute(LIVE_OID).fetchone()[0]

    def origin_lines() -> tuple[str, str]:
        report = inv("verify", "staging").stdout.splitlines()  # a schema problem fails it, not the lines
        return (next(line for line in report if line.startswith("live database: ")),
                next(line for line in report if line.startswith("previous: ")))

    previous_oid = connect("staging", "postgres").execute(
        "SELECT oid FROM pg_database WHERE datname = 'wagtail_site__previous'").fetchone()[0]
    live, previous = origin_lines()
    assert live.startswith(f"live database: wagtail_site (oid {oid}): {pushed_copy}; live since "), live
    assert previous.startswith(f"previous: wagtail_site__previous (oid {previous_oid}): ") and pushed_copy not in previous
    # Set aside by a push, or by the swap-back of a test above.
    assert re.search(r"; (set aside at|live from \S+ until .+ at) \S+(: it failed its check \(.*\))?$", previous), previous
    try:
        # The tests above swapped the kept database back out as it failed its check.
        rolled_back = inv("rollback", "staging", "--allow-failed-check", check=True).stdout
        live, previous = origin_lines()
        assert pushed_copy not in live and live.endswith(", by a rollback"), live
        assert "staging now runs the database it had kept as wagtail_site__previous: " in rolled_back
        assert previous.startswith(f"previous: wagtail_site__previous (oid {oid}): {pushed_copy}; live from "), previous
        assert " until a rollback at " in previous
    finally:
        forward = inv("rollback", "staging", check=True).stdout  # forward again, for the tests after this one
    assert f"staging now runs the database it had kept as wagtail_site__previous: {pushed_copy}; " in forward
    live, _previous = origin_lines()
    assert live.startswith(f"live database: wagtail_site (oid {oid}): {pushed_copy}; live since ") and live.endswith(
        ", by a rollback"), live


def test_a_comment_of_someones_own_on_a_database_is_left_as_it_is(pushed, connect):
    """drydock notes its swaps in a database's comment only where the comment is its own record."""
    own = "kept by hand: ops ticket 12"
    comment = ("SELECT shobj_description(oid, 'pg_database') FROM pg_database"
               " WHERE oid = (SELECT oid FROM pg_database WHERE datname = %s)")
    server = connect("staging", "postgres")
    server.execute(f"COMMENT ON DATABASE wagtail_site__previous IS '{own}'")
    try:
        inv("rollback", "staging", check=True)  # it goes live: an exchange notes the time on both
        assert server.execute(comment, ("wagtail_site",)).fetchone()[0] == own
    finally:
        inv("rollback", "staging", check=True)  # forward again, for the tests after this one
    assert server.execute(comment, ("wagtail_site__previous",)).fetchone()[0] == own


def test_second_push_while_locked_is_refused(pushed, connect):
    lock = runs_dir() / "locks" / "staging.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "task": "push",
                                "started": "now"}))
    try:
        before = fingerprint(connect("staging"))
        proc = inv("push", "staging")
        assert proc.returncode == 1
        assert "staging is locked by push" in error_lines(proc)[-1]
        assert fingerprint(connect("staging")) == before
    finally:
        lock.unlink()


def test_playbook_without_limit_is_refused(pushed, connect):
    before = {env: fingerprint(connect(env)) for env in ("production", "staging")}
    proc = playbook("restore_database.yml", "-e", f"drydock_dump={pushed[1].path}")
    assert proc.returncode != 0 and "refusing to restore onto 2 environments at once" in proc.stdout
    assert {env: fingerprint(connect(env)) for env in ("production", "staging")} == before


def test_playbook_refuses_another_name_for_the_replaced_database(pushed, connect):
    """The swap-back and rollback rename <db>__previous back: kept under another name, a
    failed health check would have put the database from before the last push live."""
    before = fingerprint(connect("staging"))
    proc = playbook("restore_database.yml", "--limit", "staging", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", "pg_restore_previous=wagtail_site_old")
    assert proc.returncode != 0 and "pg_restore_previous cannot be changed for a server" in proc.stdout
    assert fingerprint(connect("staging")) == before
    assert "wagtail_site_old" not in databases(connect("staging", "postgres"))


def test_a_push_to_an_environment_named_otherwise_is_refused_before_the_upload(pushed, connect):
    """drydock_env must be the inventory name (backups/<name>/): a protected target's safety
    backup would refuse it, but only after the upload and the checks; it is refused first."""
    before = fingerprint(connect("production"))
    proc = playbook("restore_database.yml", "--limit", "production", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", "drydock_confirm=production", "-e", "drydock_env=prod")
    assert proc.returncode != 0
    assert "drydock_env (prod) must be the host's inventory name (production)" in proc.stdout
    assert "TASK [pg_restore" not in proc.stdout  # nothing uploaded, nothing checked on the host
    assert fingerprint(connect("production")) == before


PREVIOUS_OID = "SELECT oid FROM pg_database WHERE datname = 'wagtail_site__previous'"


def previous_line(report: str) -> str:
    return next(line for line in report.splitlines() if line.startswith("previous: "))


def failing_health_check_push(pushed, sandbox_env):
    return playbook("restore_database.yml", "--limit", "staging", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", f"drydock_app_health_url=http://{sandbox_env['staging']['host']}:8000/no-such-page",
                    "-e", "app_service_health_timeout=2")


def test_a_failed_health_check_swaps_the_live_database_back(pushed, connect, sandbox_env):
    """...and leaves <db>__previous as it found it: the database inv rollback would bring back
    before the push still is (the swap kept it until the checks passed). The copy that failed
    is kept aside, with whatever it took while live, until the next push."""
    before = fingerprint(connect("staging"))
    postgres = connect("staging", "postgres")
    live, previous = postgres.execute(LIVE_OID).fetchone(), postgres.execute(PREVIOUS_OID).fetchone()
    assert previous is not None  # the fixture's push made one
    previous_before = previous_line(inv("verify", "staging").stdout)
    proc = failing_health_check_push(pushed, sandbox_env)
    assert proc.returncode != 0
    # The check itself is broken here: it fails on the database swapped back too, and the line says so.
    line = " ".join(proc.stdout.split())
    assert f"(swapped back: staging runs its previous database again; {BEFORE_THIS_PUSH}; {FAILED_AGAIN}" in line, \
        proc.stdout[-3000:]
    assert postgres.execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("staging")) == before
    assert postgres.execute(PREVIOUS_OID).fetchone() == previous
    assert previous_line(inv("verify", "staging").stdout) == previous_before  # its record too
    assert not {name for name in databases(postgres) if name.endswith(("__incoming", "__swapping"))}
    assert "wagtail_site__previous__old" in databases(postgres)
    assert app_serves(sandbox_env, "staging")


def test_a_failed_push_onto_a_target_without_a_previous_database_keeps_the_copy_named(pushed, connect, sandbox_env):
    """Before a target's first push there is no <db>__previous to put back: the copy that failed
    is kept under that name, named so (inv verify), and inv rollback refuses to bring it back."""
    staging = sandbox_env["staging"]
    postgres = connect("staging", "postgres")
    live = postgres.execute(LIVE_OID).fetchone()
    before = fingerprint(connect("staging"))
    subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "ALTER DATABASE wagtail_site__previous RENAME TO"
                                                          " wagtail_site_hidden")], check=True)
    try:
        proc = failing_health_check_push(pushed, sandbox_env)
        assert proc.returncode != 0
        assert (f"(swapped back: staging runs its previous database again; the copy that failed is kept as"
                f" wagtail_site__previous, marked so that inv rollback refuses it unless --allow-failed-check;"
                f" {FAILED_AGAIN}") in " ".join(
            proc.stdout.split()), proc.stdout[-3000:]
        assert postgres.execute(LIVE_OID).fetchone() == live
        assert fingerprint(connect("staging")) == before
        previous = previous_line(inv("verify", "staging").stdout)
        assert re.search(r" until a swap-back at \S+: it failed its check \(the app failed its health check: "
                         r"http://\S+/no-such-page answered 404 for 2 s \(Status code was 404", previous), previous
        refused = inv("rollback", "staging")
        assert refused.returncode == 1
        assert re.fullmatch(r"drydock: error: staging: refusing to roll back staging: wagtail_site__previous is the"
                            r" database swapped back out at \S+ as it failed its check \(the app failed its health"
                            r" check: .*\); fix the cause and push again, or, if the check itself was wrong, pass"
                            r" --allow-failed-check \(ansible-playbook: -e drydock_allow_failed_check=true\); the app"
                            r" was left running", error_lines(refused)[-1]), error_lines(refused)[-1]
        assert postgres.execute(LIVE_OID).fetchone() == live
        assert app_serves(sandbox_env, "staging")
    finally:
        # The copy that failed, unless the swap-back failed and it is staging's own database there.
        if postgres.execute(PREVIOUS_OID).fetchone() not in (None, live):
            subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "DROP DATABASE wagtail_site__previous")], check=True)
        if postgres.execute(PREVIOUS_OID).fetchone() is None:
            subprocess.run(["/bin/sh", "-c", as_db_owner(
                staging, "ALTER DATABASE wagtail_site_hidden RENAME TO wagtail_site__previous")], check=True)


def test_a_failed_push_onto_a_target_whose_live_database_is_gone_keeps_its_previous(pushed, connect, sandbox_env):
    """A live database dropped by hand: the swap replaces nothing and leaves <db>__previous
    as it is (moved aside, it was dropped with nothing in its place). A failed check then
    has nothing to go back to: the app is left stopped, not started on the copy that failed."""
    staging = sandbox_env["staging"]
    service = str(ROOT / ".sandbox" / "staging" / "app-service")
    postgres = connect("staging", "postgres")
    previous = postgres.execute(PREVIOUS_OID).fetchone()
    assert previous is not None  # the fixture's push made one
    subprocess.run([service, "stop"], check=True)
    subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "ALTER DATABASE wagtail_site RENAME TO wagtail_site_gone")],
                   check=True)
    try:
        proc = failing_health_check_push(pushed, sandbox_env)
        assert proc.returncode != 0
        assert ("(not swapped back; nothing was live before the swap to go back to: the pushed copy is live, and the"
                " app was left stopped)") in " ".join(proc.stdout.split()), proc.stdout[-3000:]
        assert postgres.execute(PREVIOUS_OID).fetchone() == previous
        assert not {name for name in databases(postgres) if name.endswith(("__old", "__incoming", "__swapping"))}
        assert not app_serves(sandbox_env, "staging")
    finally:
        subprocess.run([service, "stop"], check=True)
        subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "DROP DATABASE IF EXISTS wagtail_site WITH (FORCE)")],
                       check=True)
        subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "ALTER DATABASE wagtail_site_gone RENAME TO wagtail_site")],
                       check=True)
        subprocess.run([service, "start"], check=True)
    assert app_serves(sandbox_env, "staging")


def test_without_a_health_url_a_database_that_does_not_answer_is_swapped_back(pushed, connect, sandbox_env):
    """The SQL check is all a target without drydock_app_health_url has: it must fail the push too."""
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    before = fingerprint(connect("staging"))
    proc = playbook("restore_database.yml", "--limit", "staging", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", "drydock_app_health_url=", "-e", "app_service_database=no_such_database")
    assert proc.returncode != 0
    assert f"(swapped back: staging runs its previous database again; {BEFORE_THIS_PUSH}; {FAILED_AGAIN}" in " ".join(
        proc.stdout.split()), proc.stdout[-3000:]
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_a_stop_command_that_fails_without_a_word_is_named_in_the_line(pushed, connect, sandbox_env):
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    proc = playbook("restore_database.yml", "--limit", "staging", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", json.dumps({"drydock_app_stop_command": ["/bin/false"]}))
    assert proc.returncode != 0
    assert ("/bin/false exited with status 1 (nothing was swapped: the live database is unchanged; the app did not"
            " stop)") in " ".join(proc.stdout.split()), proc.stdout[-3000:]
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert app_serves(sandbox_env, "staging")


def test_a_rollback_whose_app_will_not_stop_says_nothing_was_rolled_back(pushed, connect, sandbox_env):
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    proc = playbook("rollback_database.yml", "--limit", "staging", "-e", "drydock_allow_failed_check=true",
                    "-e", json.dumps({"drydock_app_stop_command": ["/bin/false"]}))  # (whatever the tests above kept)
    assert proc.returncode != 0
    assert ("/bin/false exited with status 1 (nothing was rolled back: staging runs the database it ran before, and"
            " its app was started again)") in " ".join(proc.stdout.split()), proc.stdout[-3000:]
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert app_serves(sandbox_env, "staging")


def test_a_start_command_that_fails_without_a_word_is_named_in_the_line(pushed, sandbox_env, tmp_path):
    failures = tmp_path / "failures.jsonl"
    proc = subprocess.run(["ansible-playbook", "playbooks/restart_app.yml", "--limit", "staging",
                           "-e", json.dumps({"drydock_app_start_command": ["/bin/false"]})],
                          env=dict(ansible_env(), DRYDOCK_FAILURES_FILE=str(failures)), cwd=ROOT, capture_output=True,
                          text=True)
    try:
        assert proc.returncode != 0
        assert json.loads(failures.read_text().splitlines()[0])["msg"] == "/bin/false exited with status 1"
    finally:
        inv("app.restart", "staging", check=True)  # stopped by the restart whose start failed
    assert app_serves(sandbox_env, "staging")


def test_a_password_in_the_health_url_is_shown_nowhere(sandbox_env, tmp_path):
    """A staging site behind a login checked with https://user:password@…: the failed check's
    line (journal, database comment) shows the URL without them, and Ansible's output neither."""
    host = sandbox_env["staging"]["host"]
    failures = tmp_path / "failures.jsonl"
    proc = subprocess.run(["ansible-playbook", "playbooks/restart_app.yml", "--limit", "staging",
                           "-e", f"drydock_app_health_url=http://drydock:s3cret@{host}:8000/no-such-page",
                           "-e", "app_service_health_timeout=2"],
                          env=dict(ansible_env(), DRYDOCK_FAILURES_FILE=str(failures)), cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    line = json.loads(failures.read_text().splitlines()[0])["msg"]
    assert line.startswith(f"the app failed its health check: http://{host}:8000/no-such-page answered 404 for 2 s"), line
    assert "s3cret" not in proc.stdout + proc.stderr + failures.read_text()
    assert app_serves(sandbox_env, "staging")  # started again: only the check was wrong


def test_a_health_url_whose_password_could_not_be_left_out_is_refused_before_the_app_stops(sandbox_env):
    """An unencoded / in the password: the lines that quote the URL could not tell it from the
    path, and would show it. Refused first, quoting none of it; the app is never stopped."""
    host = sandbox_env["staging"]["host"]
    pid_before = (ROOT / ".sandbox" / "staging" / "app.pid").read_text()
    proc = playbook("restart_app.yml", "--limit", "staging",
                    "-e", f"drydock_app_health_url=http://drydock:Pa55/s3cret@{host}:8000/healthz")
    assert proc.returncode != 0
    assert ("drydock_app_health_url of staging is not a URL of the form http(s)://[USER:PASSWORD@]HOST[:PORT]/PATH"
            in " ".join(proc.stdout.split())), proc.stdout[-3000:]
    assert "s3cret" not in proc.stdout + proc.stderr
    assert (ROOT / ".sandbox" / "staging" / "app.pid").read_text() == pid_before
    assert app_serves(sandbox_env, "staging")


def test_a_failed_health_check_swaps_back_even_when_the_app_then_will_not_stop(pushed, connect, sandbox_env,
                                                                              tmp_path):
    """The stop before the swap-back fails (the first stop, before the swap, works): the
    database goes back all the same, and the message says what is wrong with the app."""
    service = ROOT / ".sandbox" / "staging" / "app-service"
    stopped_once = tmp_path / "stopped-once"
    stop = ["/bin/sh", "-c", f"[ ! -e {stopped_once} ] && touch {stopped_once} && exec {service} stop"
                             f" || {{ echo 'the app did not stop' >&2; exit 1; }}"]
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    before = fingerprint(connect("staging"))
    proc = playbook("restore_database.yml", "--limit", "staging", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", f"drydock_app_health_url=http://{sandbox_env['staging']['host']}:8000/no-such-page",
                    "-e", "app_service_health_timeout=2", "-e", json.dumps({"drydock_app_stop_command": stop}))
    assert proc.returncode != 0
    assert (f"(swapped back: staging runs its previous database again; {BEFORE_THIS_PUSH}; the app did not stop; "
            f"{FAILED_AGAIN}") in " ".join(
        proc.stdout.split()), proc.stdout[-3000:]
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")


def test_a_failing_swap_back_leaves_the_app_stopped_and_says_what_is_live(pushed, connect, sandbox_env, tmp_path):
    """The stop before the swap-back also renames <db>__previous away, so the swap-back
    fails: the app stays stopped (not started on the copy that failed its check), the line
    says the pushed copy is live and how to go back, and following that advice brings the
    previous database back and starts the app."""
    staging = sandbox_env["staging"]
    service = ROOT / ".sandbox" / "staging" / "app-service"
    stopped_once = tmp_path / "stopped-once"
    hide = as_db_owner(staging, "ALTER DATABASE wagtail_site__previous RENAME TO wagtail_site__aside")
    stop = ["/bin/sh", "-c", f"if [ -e {stopped_once} ]; then {hide} || exit 1; fi; touch {stopped_once}; "
                             f"exec {service} stop"]
    live = connect("staging", "postgres").execute(LIVE_OID).fetchone()
    before = fingerprint(connect("staging"))
    proc = playbook("restore_database.yml", "--limit", "staging", "-e", f"drydock_dump={pushed[1].path}",
                    "-e", f"drydock_app_health_url=http://{staging['host']}:8000/no-such-page",
                    "-e", "app_service_health_timeout=2", "-e", json.dumps({"drydock_app_stop_command": stop}))
    try:
        assert proc.returncode != 0
        assert ("(not swapped back; the swap-back failed (cannot exchange: database wagtail_site__previous does not"
                " exist): the pushed copy is still live, and the app was left stopped; run inv rollback staging once"
                " the cause is fixed)") in proc.stdout, proc.stdout[-3000:]
        with pytest.raises(OSError):  # URLError: connection refused
            urllib.request.urlopen(f"http://{staging['host']}:8000/healthz", timeout=10)
    finally:
        subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "ALTER DATABASE wagtail_site__aside RENAME TO wagtail_site__previous")],
                       check=True)
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() != live  # the pushed copy
    # Nothing was dropped: the generation before the push's __previous is still kept aside
    # (the next push's swap drops it).
    assert "wagtail_site__previous__old" in databases(connect("staging", "postgres"))
    inv("rollback", "staging", "--yes", check=True)
    assert connect("staging", "postgres").execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")  # the rollback started it
    subprocess.run(["/bin/sh", "-c", as_db_owner(staging, "DROP DATABASE wagtail_site__previous__old")], check=True)


def newest_local_dump(scrubbed: bool):
    for manifest in sorted((backups_dir() / "local").glob("*/manifest.json"), reverse=True):
        dump = dumps.load(dumps.in_folder(manifest.parent))
        if bool(dump.manifest["scrubbed"]) == scrubbed:
            return dump
    raise AssertionError("no such local dump")


EMAILS = {"name": "user_emails", "table": "auth_user", "sql": "UPDATE auth_user SET email = 'x@example.invalid'"}


@pytest.mark.parametrize("rules, refusal", [
    # A misspelt table: without `required: false`, the rule must not be skipped quietly.
    ([{**EMAILS, "table": "auth_usr"}, {"name": "sessions", "table": "django_session", "sql": "DELETE FROM django_session"}],
     "scrub rule user_emails: its table auth_usr does not exist, so its data would leave unscrubbed"),
    ([{**EMAILS, "table": "auth_usr", "required": "false"}],  # as an inventory may quote it
     "no scrub rule ran on wagtail_site__outgoing (none of the 1 in pg_scrub_rules has its table)"),
    ([], "no scrub rule ran on wagtail_site__outgoing (pg_scrub_rules is empty): nothing would be scrubbed"),
])
def test_a_scrub_rule_for_a_missing_table_stops_the_push_before_anything_leaves(pushed, connect, tmp_path, rules, refusal):
    before = sorted((backups_dir() / "local").iterdir())
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps({"pg_scrub_rules": rules}))
    proc = playbook("prepare_push.yml", "--limit", "local", "-e", f"@{rules_file}")
    assert proc.returncode != 0
    assert refusal in " ".join(proc.stdout.split()), proc.stdout[-2000:]
    assert sorted((backups_dir() / "local").iterdir()) == before  # no dump was made
    assert "wagtail_site__outgoing" not in databases(connect("local", "postgres"))


def test_a_local_database_never_pulled_is_named_not_the_scrub_rules(pushed, connect, sandbox_env):
    """An empty local database lacks every rule's table: the push says why, rather than
    steering to the rules."""
    local = sandbox_env["local"]
    subprocess.run(["/bin/sh", "-c", as_db_owner(local, "CREATE DATABASE wagtail_empty OWNER wagtail_site")], check=True)
    try:
        before = sorted((backups_dir() / "local").iterdir())
        proc = playbook("prepare_push.yml", "--limit", "local", "-e", "drydock_db_name=wagtail_empty")
        assert proc.returncode != 0
        assert ("wagtail_empty__outgoing holds no Django tables (no django_migrations): there is nothing to push;"
                " pull a copy into the local database first (inv pull <server>)") in " ".join(proc.stdout.split()), \
            proc.stdout[-2000:]
        assert sorted((backups_dir() / "local").iterdir()) == before
        assert "wagtail_empty__outgoing" not in databases(connect("local", "postgres"))
    finally:
        subprocess.run(["/bin/sh", "-c", as_db_owner(local, "DROP DATABASE IF EXISTS wagtail_empty")], check=True)


def test_scrubbed_dump_is_refused_by_production(pushed, connect):
    before = fingerprint(connect("production"))
    proc = inv("push", "production", "--yes", "--dump", str(newest_local_dump(scrubbed=True).path))
    assert proc.returncode == 1 and "refusing to push a scrubbed copy" in error_lines(proc)[-1]
    assert fingerprint(connect("production")) == before


def test_unscrubbed_dump_is_refused_by_staging_unless_allowed(pushed, connect):
    before = fingerprint(connect("staging"))
    production_dump = str(dumps.latest("production").path)
    proc = inv("push", "staging", "--dump", production_dump)
    assert proc.returncode == 1 and "refusing to push an unscrubbed copy" in error_lines(proc)[-1]
    assert "or pass --allow-unscrubbed knowingly" in error_lines(proc)[-1]
    assert fingerprint(connect("staging")) == before
    allowed = inv("push", "staging", "--dump", production_dump, "--allow-unscrubbed")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    emails = [e for (e,) in connect("staging").execute("SELECT email FROM auth_user")]
    assert any(e.endswith("@drydock-example.org") for e in emails)  # the real ones, as asked
    inv("rollback", "staging", check=True)
    assert fingerprint(connect("staging")) == before


def test_a_scrub_record_the_apps_role_writes_on_production_is_not_believed(pushed, connect):
    """The app's role owns its database and may comment on it: a comment claiming that the
    scrub rules ran must not make production's backup a scrubbed copy, which staging would
    take without --allow-unscrubbed."""
    production = connect("production")
    own = production.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database"
                             " WHERE datname = 'wagtail_site'").fetchone()[0]
    forged = json.dumps({**(json.loads(own) if own else {}), "drydock_scrubbed": ["user_emails", "user_passwords"]})
    production.execute(sql.SQL("COMMENT ON DATABASE wagtail_site IS {}").format(forged))  # as the app's role
    try:
        inv("backup", "production", check=True)
    finally:
        production.execute(sql.SQL("COMMENT ON DATABASE wagtail_site IS {}").format(own))
    backup = dumps.latest("production")
    assert backup.manifest["scrubbed"] == []
    before = fingerprint(connect("staging"))
    proc = inv("push", "staging", "--dump", str(backup.path.parent))
    assert proc.returncode == 1 and "refusing to push an unscrubbed copy" in error_lines(proc)[-1], proc.stderr[-2000:]
    assert fingerprint(connect("staging")) == before


def test_playbook_refuses_production_without_confirmation(pushed, connect):
    before = fingerprint(connect("production"))
    proc = playbook("restore_database.yml", "--limit", "production", "-e", f"drydock_dump={dumps.latest('production').path}")
    assert proc.returncode != 0 and "refusing to push to production without confirmation" in proc.stdout
    assert fingerprint(connect("production")) == before


def test_production_push_needs_confirmation(pushed, connect):
    before = fingerprint(connect("production"))
    proc = subprocess.run([*INV, "push", "production"],
                          env=ansible_env(), cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "without confirmation" in error_lines(proc)[-1]
    assert fingerprint(connect("production")) == before


def test_production_push_after_a_write_is_refused_and_changes_nothing(pushed, connect):
    inv("pull", "production", check=True)  # a fresh backup: the copy is based on it
    conn = connect("production")
    conn.execute("UPDATE blog_post SET body = body || '<p>edited after the backup</p>'"
                 " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    time.sleep(1.2)  # statistics reach the shared counters within a second
    before = fingerprint(conn)
    safety_backups = sorted((backups_dir() / "production").iterdir())
    proc = inv("push", "production", "--yes")
    assert proc.returncode == 1
    assert "taken writes since the backup" in error_lines(proc)[-1] and "blog_post (+1)" in error_lines(proc)[-1]
    assert fingerprint(connect("production")) == before
    assert sorted((backups_dir() / "production").iterdir()) == safety_backups
    assert "wagtail_site__incoming" not in databases(connect("production", "postgres"))


def test_production_push_after_a_truncate_is_refused(pushed, connect):
    """TRUNCATE leaves the write counters as they were: the table's new file gives it away."""
    setup = connect("production")
    setup.execute("CREATE TABLE drydock_test_truncated (n int)")
    setup.execute("INSERT INTO drydock_test_truncated VALUES (1), (2)")
    setup.close()  # a session sends its write counters as it exits
    inv("pull", "production", check=True)  # the copy holds the table and its two rows
    conn = connect("production")
    conn.execute("TRUNCATE drydock_test_truncated")
    before = fingerprint(conn)
    try:
        proc = inv("push", "production", "--yes")
        assert proc.returncode == 1
        assert "drydock_test_truncated (truncated or rewritten)." in error_lines(proc)[-1], error_lines(proc)[-1]
        assert fingerprint(connect("production")) == before
    finally:  # a new session: had the push gone through, the swap would have ended this one
        connect("production").execute("DROP TABLE IF EXISTS drydock_test_truncated")
        inv("backup", "production", check=True)  # `--latest` after this test must not bring the table back


def test_production_backup_pushed_back_counts_the_writes_since_it(pushed, connect):
    """Restoring production from one of its own backups: the backup is its own baseline, so
    the writes production took since are named and nothing changes (this used to fail on a
    backup's missing lineage, with --allow-lost-writes too)."""
    inv("backup", "production", check=True)
    backup = dumps.latest("production")
    conn = connect("production")
    conn.execute("UPDATE blog_post SET body = body || '<p>edited after the backup</p>'"
                 " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    time.sleep(1.2)  # statistics reach the shared counters within a second
    before = fingerprint(conn)
    proc = inv("push", "production", "--yes", "--dump", str(backup.path.parent))
    assert proc.returncode == 1
    line = error_lines(proc)[-1]
    assert f"taken writes since the backup of {backup.manifest['created']}" in line and "blog_post (+1)" in line
    assert fingerprint(connect("production")) == before


def test_a_write_while_the_backup_counts_rows_is_counted_as_a_write_since_it(pushed, connect):
    """The backup reads the write counters before its snapshot: a write committed once the
    snapshot is taken is not in the dump, so a push of that dump must name it, not lose it.
    Here the backup is held on a locked table while production takes the write."""
    holder = connect("production", autocommit=False)
    holder.execute("LOCK TABLE auth_group IN ACCESS EXCLUSIVE MODE")  # the counting waits here
    backup = subprocess.Popen([*INV, "backup", "production"],
                              env=ansible_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        watcher = connect("production")
        deadline = time.monotonic() + 120
        while not watcher.execute("SELECT count(*) FROM pg_locks WHERE NOT granted"
                                  " AND relation = 'auth_group'::regclass").fetchone()[0]:
            assert backup.poll() is None and time.monotonic() < deadline, "the backup never reached its snapshot"
            time.sleep(0.1)
        watcher.execute("UPDATE blog_post SET body = body || '<p>written while the backup counted</p>'"
                        " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
        time.sleep(1.2)  # statistics reach the shared counters within a second
    finally:
        holder.rollback()
        out, err = backup.communicate(timeout=300)
    assert backup.returncode == 0, out[-2000:] + err[-2000:]
    before = fingerprint(connect("production"))
    proc = inv("push", "production", "--yes", "--dump", str(dumps.latest("production").path.parent))
    assert proc.returncode == 1
    assert "blog_post (+1)" in error_lines(proc)[-1]
    assert fingerprint(connect("production")) == before


def test_a_copy_of_staging_is_refused_by_production_even_allowing_lost_writes(pushed, connect):
    """Staging's data is scrubbed: pushed to production, pulled or as a backup of staging's,
    it would replace the real users."""
    inv("pull", "staging", check=True)
    before = fingerprint(connect("production"))
    proc = inv("push", "production", "--yes", "--allow-lost-writes")
    assert proc.returncode == 1 and "a copy of staging's data" in error_lines(proc)[-1]
    backup = inv("push", "production", "--yes", "--allow-lost-writes", "--dump", str(dumps.latest("staging").path))
    assert backup.returncode == 1 and "a copy of staging's data" in error_lines(backup)[-1]
    assert fingerprint(connect("production")) == before


def test_production_push_keeps_real_emails_and_the_next_push_counts_writes_from_it(pushed, connect):
    """The push replaced production's database, whose write counters start afresh: the next
    push from the same backup must neither see writes that never happened nor bury a real
    one among the counters of the database the push replaced."""
    inv("pull", "production", check=True)
    proc = inv("push", "production", "--yes")
    assert proc.returncode == 0, proc.stderr[-2000:]
    emails = [e for (e,) in connect("production").execute("SELECT email FROM auth_user")]
    assert any(e.endswith("@drydock-example.org") for e in emails)
    safety = dumps.latest("production", kind="safety")  # protected: a file backup before the push
    assert safety.path.name in proc.stdout
    assert_private(safety.path)
    assert_private(dumps.latest("local").path)  # the unscrubbed copy of production's data
    assert dumps.latest("local").manifest["scrubbed"] == []
    again = inv("push", "production", "--yes")  # nothing wrote to production in between
    assert again.returncode == 0, again.stderr[-2000:]
    conn = connect("production")
    conn.execute("UPDATE blog_post SET body = body || '<p>edited after the push</p>'"
                 " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    time.sleep(1.2)  # statistics reach the shared counters within a second
    before = fingerprint(conn)
    refused = inv("push", "production", "--yes")
    assert refused.returncode == 1
    line = error_lines(refused)[-1]
    assert "taken writes since the backup" in line and line.count("(+") == 1 and "blog_post (+1)." in line
    assert fingerprint(connect("production")) == before


def test_a_push_refused_after_its_restore_takes_no_safety_backup(pushed, connect):
    """The safety backup comes once the copy has passed every check: a push refused for its
    schema costs no full dump, and rotates no older safety backup out."""
    inv("backup", "production", check=True)
    backup = dumps.latest("production")
    conn = connect("production")
    conn.execute("INSERT INTO django_migrations (app, name, applied) VALUES ('blog', '9999_from_newer_code', now())")
    safety_backups = sorted((backups_dir() / "production").glob("safety/*"))
    try:
        proc = inv("push", "production", "--yes", "--allow-lost-writes", "--dump", str(backup.path.parent))
        assert proc.returncode == 1
        line = error_lines(proc)[-1]
        assert "refusing to swap in a copy without 1 migration(s) production has applied" in line
        # Not the local copy's: migrating that would not change this dump.
        assert f"push a copy that has them (this dump is production's of {backup.manifest['created']})" in line, line
        assert sorted((backups_dir() / "production").glob("safety/*")) == safety_backups
    finally:
        conn.execute("DELETE FROM django_migrations WHERE name = '9999_from_newer_code'")


def test_a_safety_backup_without_room_refuses_the_push_before_its_restore(pushed, connect, sandbox_env, tmp_path):
    """A protected target's safety backup is taken after the restore, on a disk the restored
    copy then shares: one that will not fit then is refused before the upload, not once the
    restore has taken its minutes, and nothing is deleted to make room for it."""
    inv("backup", "production", check=True)
    backup = dumps.latest("production")
    folder = sandbox_env["production"]["backup_dir"]
    disk = os.statvfs(folder)
    free = disk.f_bavail * disk.f_frsize
    # The copy will take half the free disk (as its manifest says), and three quarters must
    # stay free: room for the safety backup now, none once the copy is restored.
    copy = tmp_path / backup.path.parent.name
    copy.mkdir(mode=0o700)
    shutil.copy2(backup.path, copy / backup.path.name)
    (copy / "manifest.json").write_text(json.dumps(dict(backup.manifest, database_size=free // 2)))
    stale = os.path.join(folder, "wagtail_site-20000101T000000Z.dump.zst.partial")  # the dump would delete it
    open(stale, "w").close()
    before = fingerprint(connect("production"))
    safety_backups = sorted((backups_dir() / "production").glob("safety/*"))
    try:
        proc = playbook("restore_database.yml", "--limit", "production", "-e", f"drydock_dump={copy / backup.path.name}",
                        "-e", "drydock_confirm=production", "-e", "drydock_allow_lost_writes=true",
                        "-e", f"pg_backup_min_free_mb={free * 3 // 4 // 10**6}")
        assert proc.returncode != 0
        assert re.search(rf"not enough disk on this host for the dump in {folder} once the restore has taken "
                         r"[\d.]+ [KMGT]?B: [\d.]+ [KMGT]?B free \(counting the files it may delete\)",
                         " ".join(proc.stdout.split())), proc.stdout[-3000:]
        assert "Upload and check the dump" not in proc.stdout  # refused before the upload and the restore
        assert os.path.exists(stale)
    finally:
        os.unlink(stale)
    assert fingerprint(connect("production")) == before
    assert "wagtail_site__incoming" not in databases(connect("production"))
    assert sorted((backups_dir() / "production").glob("safety/*")) == safety_backups


def test_pushing_a_safety_backup_back_never_rotates_it_away(pushed, connect):
    """Restoring production from a safety backup takes a new safety backup, whose rotation
    must spare the one being pushed, however few it keeps."""
    safety = dumps.latest("production", kind="safety")  # test_production_push_keeps_real_emails… made some
    proc = playbook("restore_database.yml", "--limit", "production", "-e", f"drydock_dump={safety.path}",
                    "-e", "drydock_confirm=production", "-e", "drydock_allow_lost_writes=true",
                    "-e", "drydock_allow_older_schema=true", "-e", "pg_backup_keep=1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert safety.path.is_file() and (safety.path.parent / "manifest.json").is_file()
    newer = dumps.latest("production", kind="safety")
    assert newer.path != safety.path
    assert sorted(p.name for p in safety.path.parent.parent.iterdir()) == sorted(
        [safety.path.parent.name, newer.path.parent.name])  # keep=1 deleted the rest
    # Its stamp names a folder under backups/production/safety/, and verify says so.
    assert f"pushed from production's safety backup {safety.manifest['created']}" in inv("verify", "production").stdout


def test_the_check_made_with_the_app_stopped_counts_writes_a_session_still_holds_back(pushed, connect):
    """A session sends its latest write counters at most once a second, or after 10 s idle, or
    as it exits: the freshness check made once the app is stopped ends the other sessions
    first, so a pooler's or a worker's last writes are counted too."""
    before = connect("production").execute(
        "SELECT n_tup_upd + n_tup_ins + n_tup_del FROM pg_stat_user_tables WHERE relname = 'blog_post'").fetchone()[0]
    worker = connect("production")
    worker.execute("UPDATE wagtailcore_site SET site_name = site_name")  # its first counters go at once
    worker.execute("UPDATE blog_post SET body = body WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    facts = run_module("production", "drydock_db_facts", "row_counts=false end_other_sessions=true")
    assert facts["write_fingerprint"]["tables"]["blog_post"] == before + 1
    with pytest.raises(psycopg.OperationalError):  # the worker's session was ended
        worker.execute("SELECT 1")


def test_rolling_production_back_after_it_took_writes_is_refused_unless_allowed(pushed, connect, sandbox_env):
    """The rollback puts the live database aside as __previous, which the next push drops: a
    write production took since the push would be lost without a word."""
    # First a database pushed in, written to, then replaced by the next push: the one the
    # rollback below brings back, whatever the tests before left, has a push's baseline
    # older than its last write.
    inv("pull", "production", check=True)
    inv("push", "production", "--yes", check=True)
    # In a session of its own, which reports its write counters as it ends: the backup below counts it.
    with psycopg.connect(sandbox_env["production"]["url"], autocommit=True) as writer:
        writer.execute("UPDATE blog_post SET body = body || '<p>written before the next push</p>'"
                       " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    inv("pull", "production", check=True)
    inv("push", "production", "--yes", check=True)
    pushed_oid = connect("production", "postgres").execute(LIVE_OID).fetchone()
    connect("production").execute("UPDATE blog_post SET body = body || '<p>written after the push</p>'"
                                  " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    time.sleep(1.2)  # statistics reach the shared counters within a second
    before = fingerprint(connect("production"))
    refused = inv("rollback", "production", "--yes")
    assert refused.returncode == 1
    assert ("refusing to roll back production: it has taken writes since it was swapped in (blog_post (+1))"
            in error_lines(refused)[-1])
    assert connect("production", "postgres").execute(LIVE_OID).fetchone() == pushed_oid
    assert fingerprint(connect("production")) == before
    assert app_serves(sandbox_env, "production")  # the app was started again
    inv("rollback", "production", "--yes", "--allow-lost-writes", check=True)
    assert connect("production", "postgres").execute(LIVE_OID).fetchone() != pushed_oid
    # The exchange recorded the counters of the database it brought back, which the push had
    # set aside: with no write since, forward again needs no override, and it brings the
    # write back.
    inv("rollback", "production", "--yes", check=True)
    assert fingerprint(connect("production")) == before
    # The pushed database was set aside by that rollback, with the write it held: brought back,
    # it still counts from the push, so rolling it back again counts that write too.
    connect("production").execute("UPDATE blog_post SET body = body || '<p>written after the swap forward</p>'"
                                  " WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    time.sleep(1.2)
    refused = inv("rollback", "production", "--yes")
    assert refused.returncode == 1
    assert "it has taken writes since it was swapped in (blog_post (+2))" in error_lines(refused)[-1]
    assert connect("production", "postgres").execute(LIVE_OID).fetchone() == pushed_oid


def test_writes_that_cannot_be_counted_refuse_a_rollback_and_a_push(pushed, connect, sandbox_env):
    """Statistics reset on production (by hand, or a crash) leave its write counters
    incomparable: neither a rollback nor a push may then assume that nothing was written.
    Production stays reset: a later test's fresh backup or push records counters anew."""
    inv("pull", "production", check=True)
    inv("push", "production", "--yes", check=True)
    inv("backup", "production", check=True)
    backup = dumps.latest("production")
    subprocess.run(["/bin/sh", "-c", as_db_owner(sandbox_env["production"], "SELECT pg_stat_reset()", "wagtail_site")],
                   check=True, capture_output=True)
    live = connect("production", "postgres").execute(LIVE_OID).fetchone()
    before = fingerprint(connect("production"))
    rollback = inv("rollback", "production", "--yes")
    assert rollback.returncode == 1
    assert ("refusing to roll back production: its write statistics were reset" in error_lines(rollback)[-1]
            and "so the writes it took since cannot be counted" in error_lines(rollback)[-1])
    push = inv("push", "production", "--yes", "--dump", str(backup.path.parent))
    assert push.returncode == 1
    assert ("refusing to push to production: since the backup of" in error_lines(push)[-1]
            and "its write statistics were reset" in error_lines(push)[-1]
            and "so the writes it took since cannot be counted" in error_lines(push)[-1])
    assert connect("production", "postgres").execute(LIVE_OID).fetchone() == live
    assert fingerprint(connect("production")) == before
    assert app_serves(sandbox_env, "production")


def test_a_failed_push_keeps_the_write_baseline_a_rollback_counts_from(pushed, connect, sandbox_env):
    """A push swapped back puts the generation before <db>__previous back: a rollback would now
    bring back that older database, not the copy that failed. Production's writes since its
    database went live are not in it, so the rollback must still count them: the swap-back
    leaves production's write baseline as it was."""
    production = sandbox_env["production"]
    inv("pull", "production", check=True)
    inv("push", "production", "--yes", check=True)  # the live database now went live by a push
    writer = connect("production")
    writer.execute("UPDATE blog_post SET body = body WHERE page_ptr_id = (SELECT min(page_ptr_id) FROM blog_post)")
    writer.close()  # a session sends its last write counters as it exits: the backup's are then up to date
    inv("backup", "production", check=True)  # it holds that write: the push below may go ahead
    live = connect("production", "postgres").execute(LIVE_OID).fetchone()
    try:
        proc = playbook("restore_database.yml", "--limit", "production", "-e",
                        f"drydock_dump={dumps.latest('production').path}", "-e", "drydock_confirm=production",
                        "-e", f"drydock_app_health_url=http://{production['host']}:8000/no-such-page",
                        "-e", "app_service_health_timeout=2")
        assert proc.returncode != 0
        assert f"(swapped back: production runs its previous database again; {BEFORE_THIS_PUSH}" \
            in " ".join(proc.stdout.split()), proc.stdout[-3000:]
        assert connect("production", "postgres").execute(LIVE_OID).fetchone() == live
        refused = inv("rollback", "production", "--yes")
        assert refused.returncode == 1
        line = error_lines(refused)[-1]
        assert "refusing to roll back production: it has taken writes since it was swapped in (" in line, line
        assert "blog_post (+1)" in line, line
        assert connect("production", "postgres").execute(LIVE_OID).fetchone() == live
        assert app_serves(sandbox_env, "production")
    finally:
        subprocess.run(["/bin/sh", "-c", as_db_owner(production, "DROP DATABASE IF EXISTS wagtail_site__previous__old")],
                       check=True)


def test_a_write_while_the_app_stops_refuses_the_swap(pushed, connect, sandbox_env):
    """The last write check runs once the app is stopped, after the upload and the restore:
    a write production took meanwhile (here by its stop command) refuses the swap, and the
    app runs again on the live database, which keeps that write. Plain ansible-playbook
    takes the protected target's safety backup too, and deletes it again when nothing was
    swapped: a push that never went live rotates no older one out."""
    production = sandbox_env["production"]
    inv("backup", "production", check=True)
    backup = dumps.latest("production")
    write = as_db_owner(production, "UPDATE blog_post SET body = body WHERE page_ptr_id ="
                                    " (SELECT min(page_ptr_id) FROM blog_post)", "wagtail_site")
    stop = ["/bin/sh", "-c", f"{write} && exec {ROOT / '.sandbox' / 'production' / 'app-service'} stop"]
    live = connect("production", "postgres").execute(LIVE_OID).fetchone()
    safety_backups = set((backups_dir() / "production" / "safety").glob("*/manifest.json"))
    proc = playbook("restore_database.yml", "--limit", "production", "-e", f"drydock_dump={backup.path}",
                    "-e", "drydock_confirm=production", "-e", json.dumps({"drydock_app_stop_command": stop}))
    assert proc.returncode != 0
    assert "refusing to push to production: it has taken writes since the backup" in proc.stdout
    assert "blog_post (+1)" in proc.stdout
    assert ("(nothing was swapped: the live database is unchanged; the safety backup taken for it was deleted)"
            in " ".join(proc.stdout.split())), proc.stdout[-3000:]
    assert set((backups_dir() / "production" / "safety").glob("*/manifest.json")) == safety_backups
    assert connect("production", "postgres").execute(LIVE_OID).fetchone() == live
    assert "wagtail_site__incoming" not in databases(connect("production", "postgres"))
    assert app_serves(sandbox_env, "production")


def test_a_rollback_with_nothing_to_roll_back_to_leaves_the_app_running(pushed, connect, sandbox_env):
    aside = "wagtail_site__previous_kept_by_test"
    admin = connect("staging", "postgres")
    admin.execute(f"ALTER DATABASE wagtail_site__previous RENAME TO {aside}")
    pid_before = (ROOT / ".sandbox" / "staging" / "app.pid").read_text()
    try:
        proc = inv("rollback", "staging")
        assert proc.returncode == 1
        assert "nothing to roll back to: wagtail_site__previous does not exist on staging" in error_lines(proc)[-1]
        assert (ROOT / ".sandbox" / "staging" / "app.pid").read_text() == pid_before  # never stopped
        assert app_serves(sandbox_env, "staging")
    finally:
        admin.execute(f"ALTER DATABASE {aside} RENAME TO wagtail_site__previous")


def test_a_copy_without_migrations_the_target_has_applied_is_refused_unless_allowed(pushed, connect, sandbox_env):
    """Staging's code expects every migration its database has applied: a copy without one
    (never migrated, an older dump) would break the site once live."""
    connect("staging").execute("INSERT INTO django_migrations (app, name, applied)"
                               " VALUES ('blog', '9999_from_newer_code', now())")
    before = fingerprint(connect("staging"))
    proc = inv("push", "staging")
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert error_lines(proc)[0] == (
        "drydock: error: staging: refusing to swap in a copy without 1 migration(s) staging has applied"
        " (blog.9999_from_newer_code): the code it runs expects them; migrate the local copy (inv migrate) and push"
        " again, or push it knowingly with --allow-older-schema (ansible-playbook: -e drydock_allow_older_schema=true)"
        " (the live database is unchanged)")
    assert fingerprint(connect("staging")) == before
    assert "wagtail_site__incoming" not in databases(connect("staging", "postgres"))
    assert app_serves(sandbox_env, "staging")  # never stopped
    allowed = inv("push", "staging", "--allow-older-schema")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert not connect("staging").execute("SELECT 1 FROM django_migrations WHERE name = '9999_from_newer_code'").fetchall()


def test_a_push_keeps_the_servers_grants_limit_and_settings(pushed, connect, sandbox_env):
    """pg_dump carries none of them (they are the server's, set on its live database): the
    database a push swaps in gets those of the one it replaces, and roles kept out of it by a
    REVOKE CONNECT ... FROM PUBLIC stay out."""
    with server_own_settings(sandbox_env["staging"]):
        before = database_settings(connect("staging"), "wagtail_site")
        assert "=T/" in before[0] and before[1] == 77 and len(before[2]) == 2
        inv("push", "staging", "--allow-older-schema", check=True)
        assert database_settings(connect("staging"), "wagtail_site") == before


# Code the app's role could add to a server's live database after its last backup: an
# immutable function that an index expression calls with a constant. PostgreSQL evaluates that
# call while it plans any query on the table, in the session that plans it: a superuser's
# read of django_migrations would run it as the superuser (it raises then, to show it).
PLANTED_INDEX = """
CREATE FUNCTION public.planted_ok(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'planted code ran as the superuser';
    END IF;
    RETURN $1;
END $$;
CREATE INDEX planted_index ON public.django_migrations ((public.planted_ok(1)))"""


def test_code_planted_in_a_live_database_after_its_backup_is_refused_before_a_table_is_read(pushed, connect):
    """The push reads the live target's migrations and write counters, and verify its tables,
    as the superuser: each refuses first, in one line, and the planted code never runs."""
    staging = connect("staging")
    staging.execute(PLANTED_INDEX)  # as the app's role, which owns the table
    try:
        before = fingerprint(staging)
        for command in (("push", "staging", "--allow-older-schema"), ("verify", "staging")):
            proc = inv(*command)
            assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:]
            assert error_lines(proc)[0].startswith(
                "drydock: error: staging: refusing to read wagtail_site: it holds 1 function(s), trigger(s) or rule(s) of its own"
                " (public.planted_ok(integer)), which the superuser's work in it could run"), error_lines(proc)[0]
            assert "planted code ran" not in proc.stdout + proc.stderr
        assert fingerprint(connect("staging")) == before
        assert "wagtail_site__incoming" not in databases(connect("staging", "postgres"))
    finally:
        staging.execute("DROP INDEX IF EXISTS public.planted_index; DROP FUNCTION IF EXISTS public.planted_ok(int)")
