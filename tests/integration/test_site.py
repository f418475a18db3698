"""The Site switch: validated input, both Site tables, clear errors."""
import subprocess

import pytest

from drydock.playbook import ansible_env
from tests.conftest import (LIVE_OID, PLANTED_SITE_RULE, PLANTED_SITE_RULE_REMOVED, INV, ROOT, error_lines, inv, playbook,
                            run_module)

SITE = "SELECT hostname, port FROM wagtailcore_site WHERE is_default_site"


def test_switch_sets_wagtail_and_django_sites(pulled, connect):
    try:
        changed = inv("site", "local", "preview.example.test", "--port", "8443", check=True)
        assert changed.stdout.splitlines()[-1] == ("local: Site (default) is now preview.example.test:8443 "
                                                   "(it was localhost:8000)")
        conn = connect("local")
        assert conn.execute(SITE).fetchone() == ("preview.example.test", 8443)
        assert conn.execute("SELECT domain FROM django_site WHERE id = 1").fetchone()[0] == "preview.example.test:8443"
    finally:
        inv("site", "local", "localhost", check=True)  # the port defaults to local's own, 8000
    assert connect("local").execute(SITE).fetchone() == ("localhost", 8000)


def test_a_hostname_is_stored_lower_cased_and_the_default_site_named_keeps_django_site(pulled, connect):
    """Wagtail matches a request's host lower-cased: a Site stored with capitals would never
    be found. And django_site follows the default Site, whether it is named or not."""
    conn = connect("local")
    name = conn.execute("SELECT site_name FROM wagtailcore_site WHERE is_default_site").fetchone()[0]
    try:
        inv("site", "local", "Preview.Example.TEST", check=True)
        assert conn.execute(SITE).fetchone() == ("preview.example.test", 8000)
        plain = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_hostname=Plain.Example.TEST",
                         "-e", "wagtail_site_port=8000")
        assert plain.returncode == 0, plain.stdout[-2000:]
        assert conn.execute(SITE).fetchone() == ("plain.example.test", 8000)
        inv("site", "local", "named.example.test", "--site-name", name, check=True)
        assert conn.execute(SITE).fetchone() == ("named.example.test", 8000)
        assert conn.execute("SELECT domain FROM django_site WHERE id = 1").fetchone()[0] == "named.example.test:8000"
        # One stored with capitals before: verification says why it differs.
        conn.execute("UPDATE wagtailcore_site SET hostname = 'Named.Example.TEST' WHERE is_default_site")
        check = run_module("local", "drydock_site", "hostname=named.example.test site_port=8000 verify_only=true")
        assert check["problems"] == ["Named.Example.TEST:8000, expected named.example.test:8000 (stored with capitals,"
                                     " Wagtail never matches it: set it again)"]
    finally:
        inv("site", "local", "localhost", check=True)


def test_setting_the_site_production_already_has_is_no_write_that_refuses_the_next_push(pulled, connect, sandbox_env):
    """The runbook's Site example names production's own hostname: an update that changes
    nothing would still count as a write since the backup, and refuse a push to production."""
    inv("pull", "production", check=True)  # the local copy is of production's newest backup
    hostname, port = connect("production").execute(SITE).fetchone()
    same = inv("site", "production", hostname, "--port", str(port), "--yes", check=True)
    assert same.stdout.splitlines()[-1] == (f"production: Site (default) is now {hostname}:{port} "
                                            "(it was already so: nothing changed)")
    # A real push to production (its safety backup included), rolled back below: production's
    # __previous is then the pushed copy, which no later test relies on.
    old = connect("production", "postgres").execute(LIVE_OID).fetchone()
    try:
        proc = inv("push", "production", "--yes")
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        if connect("production", "postgres").execute(LIVE_OID).fetchone() != old:
            inv("rollback", "production", "--yes", check=True)


def test_production_needs_confirmation(pulled, connect):
    before = connect("production").execute(SITE).fetchone()
    proc = subprocess.run([*INV, "site", "production", "evil.test"],
                          env=ansible_env(), cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "refusing to change the Site of production without confirmation" in error_lines(proc)[-1]
    plain = playbook("site_hostname.yml", "--limit", "production", "-e", "wagtail_site_hostname=evil.test")
    assert plain.returncode != 0 and "without confirmation" in plain.stdout
    for word in ("staging", "yes"):  # only the environment's own name confirms
        other = playbook("site_hostname.yml", "--limit", "production", "-e", "wagtail_site_hostname=evil.test",
                         "-e", f"drydock_confirm={word}")
        assert other.returncode != 0 and "without confirmation" in other.stdout, other.stdout[-2000:]
    assert connect("production").execute(SITE).fetchone() == before


@pytest.mark.parametrize("hostname", ["example.org\n", "bad host", "x'; DROP TABLE wagtailcore_site; --", '"quoted"', "under_score.test", "trailing-.test"])
def test_bad_hostname_is_refused_with_one_line(pulled, connect, hostname):
    before = connect("local").execute(SITE).fetchone()
    proc = inv("site", "local", hostname)
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 1 and "invalid hostname" in proc.stderr
    assert connect("local").execute(SITE).fetchone() == before


# What the app's role could put on wagtailcore_site so that the superuser's UPDATE (the Site
# switch) runs what the role may not: a rule that copies a server file into a table of its
# own; a trigger of PostgreSQL's whose WHEN condition sends it; a function of the role's,
# hidden in a trusted extension the role installs (a table's CHECK calls it); a CHECK
# constraint calling a PostgreSQL function that is not immutable.
OWN_CODE = ("refusing to switch the Site of wagtail_site: it holds 1 function(s), trigger(s) or rule(s) of its own"
            " ({}), which the superuser's work in it could run")
PLANTED_ON_SITE = {
    "rule": (PLANTED_SITE_RULE, OWN_CODE.format("rule planted on public.wagtailcore_site")),
    "trigger": ("CREATE TRIGGER planted BEFORE UPDATE ON public.wagtailcore_site FOR EACH ROW"
                " WHEN (pg_notify('planted', pg_read_file('/etc/hostname')) IS NULL)"
                " EXECUTE FUNCTION suppress_redundant_updates_trigger()",
                OWN_CODE.format("trigger planted on public.wagtailcore_site")),
    "function in an extension": (
        "CREATE EXTENSION tcn; CREATE FUNCTION public.planted_ok(text) RETURNS boolean LANGUAGE sql IMMUTABLE"
        " AS 'SELECT true'; ALTER EXTENSION tcn ADD FUNCTION public.planted_ok(text);"
        " ALTER TABLE public.wagtailcore_site ADD CONSTRAINT planted CHECK (public.planted_ok(hostname))",
        OWN_CODE.format("public.planted_ok(text)")),
    "volatile CHECK": ("ALTER TABLE public.wagtailcore_site ADD CONSTRAINT planted"
                       " CHECK (set_config('application_name', 'planted', false) IS NOT NULL)",
                       "refusing to switch the Site of wagtail_site: constraint planted on public.wagtailcore_site"
                       " calls set_config(text,text,boolean): a function that is not PostgreSQL's own immutable one"
                       " would run as the superuser writes a row"),
}


@pytest.mark.parametrize("planted", sorted(PLANTED_ON_SITE))
def test_code_on_the_site_table_that_the_superusers_update_would_run_refuses_the_switch(pulled, connect, planted):
    sql, refusal = PLANTED_ON_SITE[planted]
    local = connect("local")
    local.execute(sql)  # as the app's role, which owns the tables
    try:
        before = local.execute(SITE).fetchone()
        proc = inv("site", "local", "planted.example.test")
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:]
        assert error_lines(proc)[0].startswith(f"drydock: error: local: {refusal}"), error_lines(proc)[0]
        assert local.execute(SITE).fetchone() == before
        if planted == "rule":
            assert local.execute("SELECT count(*) FROM public.planted_loot").fetchone() == (0,)
    finally:
        local.execute(f"{PLANTED_SITE_RULE_REMOVED}; DROP TRIGGER IF EXISTS planted ON public.wagtailcore_site;"
                      " ALTER TABLE public.wagtailcore_site DROP CONSTRAINT IF EXISTS planted;"
                      " DROP EXTENSION IF EXISTS tcn CASCADE")


def test_playbook_validates_the_hostname_itself(pulled, connect):
    before = connect("local").execute(SITE).fetchone()
    proc = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_hostname='bad host'")
    assert proc.returncode != 0 and "invalid Site hostname" in proc.stdout
    assert connect("local").execute(SITE).fetchone() == before


def test_database_without_site_table(pulled):
    proc = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_database=postgres")
    assert proc.returncode != 0 and "has no wagtailcore_site table" in proc.stdout


def test_no_matching_site_row(pulled):
    proc = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_name=nosuchsite")
    assert proc.returncode != 0 and "no Site matches site_name 'nosuchsite'" in proc.stdout


def test_playbook_without_limit_is_refused(pulled):
    proc = playbook("site_hostname.yml", "-e", "wagtail_site_hostname=example.test")
    assert proc.returncode != 0 and "refusing to change the Site of 3 environments at once" in proc.stdout


@pytest.fixture
def twin_sites(pulled, connect):
    """Two extra Sites that share the site_name 'Twin'; removed afterwards."""
    conn = connect("local")
    for host in ("twin-a.test", "twin-b.test"):
        conn.execute("INSERT INTO wagtailcore_site (hostname, port, site_name, root_page_id, is_default_site)"
                     " SELECT %s, 80, 'Twin', root_page_id, false FROM wagtailcore_site WHERE is_default_site", (host,))
    yield conn
    conn.execute("DELETE FROM wagtailcore_site WHERE site_name = 'Twin'")


def all_sites(conn):
    return (conn.execute("SELECT id, hostname, port, site_name FROM wagtailcore_site ORDER BY id").fetchall(),
            conn.execute("SELECT domain FROM django_site ORDER BY id").fetchall())


def test_ambiguous_site_name_changes_nothing(twin_sites):
    before = all_sites(twin_sites)
    proc = inv("site", "local", "new.test", "--site-name", "Twin")
    assert proc.returncode == 1 and "2 Sites match site_name 'Twin'" in error_lines(proc)[-1]
    assert all_sites(twin_sites) == before


def test_named_site_changes_only_that_site(twin_sites):
    twin_sites.execute("DELETE FROM wagtailcore_site WHERE hostname = 'twin-b.test'")
    default_before = twin_sites.execute(SITE).fetchone()
    django_before = all_sites(twin_sites)[1]
    inv("site", "local", "named.test", "--port", "8080", "--site-name", "Twin", check=True)
    assert twin_sites.execute("SELECT hostname, port FROM wagtailcore_site WHERE site_name = 'Twin'").fetchone() == (
        "named.test", 8080)
    assert twin_sites.execute(SITE).fetchone() == default_before
    assert all_sites(twin_sites)[1] == django_before
