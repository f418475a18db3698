"""`inv verify`: a database is checked against its code; every kind of drift is found and named."""
import hashlib
import json
import subprocess

import pytest

from drydock.paths import runs_dir
from drydock.playbook import ansible_env
from tests.conftest import ROOT, databases, error_lines, fingerprint, inv, row_counts, sandbox_inventory_with


@pytest.fixture(scope="module")
def migrated(pulled):
    """The local copy, migrated with the current code, saved as snapshot 'verified'."""
    inv("pull", "production", "--latest", check=True)
    inv("migrate", check=True)
    inv("snapshot.save", "verified", "--force", check=True)
    yield
    inv("snapshot.delete", "verified")


@pytest.fixture
def fresh(migrated, connect):
    inv("snapshot.restore", "verified", check=True)
    return connect("local")


def test_clean_migrated_database_passes(fresh, connect):
    for cached in (runs_dir() / "cache").glob("schema-*.json"):  # so that the reference is built from zero
        cached.unlink()
    # What a verification of local interrupted by Ctrl-C leaves: its scratch database, named
    # after the environment, which the next one drops.
    stale = f"wagtail_site__verify_{hashlib.sha1(b'local').hexdigest()[:8]}"
    connect("local", "postgres").execute(f"CREATE DATABASE {stale}")
    proc = inv("verify", "local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
    assert "verify local (wagtail_site): OK" in proc.stdout
    assert "row counts: not compared (no manifest)" in proc.stdout
    assert list((runs_dir() / "cache").glob("schema-*.json"))
    assert not [name for name in databases(connect("local", "postgres")) if "__verify_" in name]  # scratch dropped


DRIFTS = {
    "dropped column": ("ALTER TABLE blog_post DROP COLUMN body", "column blog_post.body: missing"),
    "extra index": ("CREATE INDEX drydock_extra ON blog_post (author_id)",
                    "index drydock_extra: not in the code's schema"),
    "changed type": ("ALTER TABLE blog_podcast ALTER COLUMN keywords TYPE text",
                     "column blog_podcast.keywords: is text not null, expected character varying(255) not null"),
    "fake migration row": ("INSERT INTO django_migrations (app, name, applied) VALUES ('blog', '0099_by_hand', now())",
                           "migration blog.0099_by_hand: recorded in django_migrations but not in the code"),
    "unapplied migration": ("DELETE FROM django_migrations WHERE app = 'blog' AND name = '0003_post_visible_date_index';"
                            " DROP INDEX blog_post_visible_date",
                            "migration blog.0003_post_visible_date_index: in the code but not applied"),
    "wrong page depth": ("UPDATE wagtailcore_page SET depth = depth + 1 WHERE slug = 'post-1'",
                         "depth does not match its path"),
    "changed default": ("ALTER TABLE blog_post ALTER COLUMN body SET DEFAULT 'x'",
                        "column blog_post.body: is text not null default 'x'::text, expected text not null"),
    # post-1 moved under a parent that does not exist; Blog's numchild kept true, so that the
    # orphan is the only thing wrong.
    "orphan page": ("UPDATE wagtailcore_page SET path = left(path, 4) || '9999' || substr(path, 9) WHERE slug = 'post-1';"
                    " UPDATE wagtailcore_page SET numchild = numchild - 1 WHERE slug = 'blog'",
                    "has no parent (orphan)"),
    # Home (depth 2) and its pages moved under a root that does not exist: only Home has no
    # parent, and the root's numchild follows, so that this orphan is the only thing wrong.
    "orphan page at depth 2": ("UPDATE wagtailcore_page SET path = '9999' || substr(path, 5) WHERE path LIKE '00010001%';"
                               " UPDATE wagtailcore_page SET numchild = numchild - 1 WHERE depth = 1",
                               "(99990001): has no parent (orphan)"),
    "wrong Site hostname": ("UPDATE wagtailcore_site SET hostname = 'wrong.example' WHERE is_default_site",
                            "Site: wrong.example:8000, expected localhost:8000"),
}


@pytest.mark.parametrize("drift", DRIFTS, ids=list(DRIFTS))
def test_drift_is_found_and_named(fresh, drift):
    sql, expected = DRIFTS[drift]
    for statement in sql.split(";"):
        fresh.execute(statement)
    proc = inv("verify", "local")
    assert proc.returncode == 1
    assert expected in proc.stdout, proc.stdout[-3000:]
    assert "local: database wagtail_site failed verification (" in error_lines(proc)[-1]


def test_a_scratch_database_an_interrupt_left_goes_with_the_reference_cached(fresh, connect):
    stale = f"wagtail_site__verify_{hashlib.sha1(b'local').hexdigest()[:8]}"
    inv("verify", "local", check=True)  # the reference is cached from here on
    connect("local", "postgres").execute(f"CREATE DATABASE {stale}")
    inv("verify", "local", check=True)
    assert stale not in databases(connect("local", "postgres"))


def test_row_counts_against_a_manifest(fresh, connect, tmp_path):
    counts = row_counts(connect("local"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"row_counts": counts}))
    passed = inv("verify", "local", "--manifest", str(manifest))
    assert passed.returncode == 0 and f"row counts: compared with {manifest}" in passed.stdout, passed.stdout[-2000:]
    counts["blog_post"] += 1
    manifest.write_text(json.dumps({"row_counts": counts}))
    proc = inv("verify", "local", "--manifest", str(tmp_path))  # the folder stands for its manifest
    assert proc.returncode == 1 and "blog_post:" in proc.stdout and "row counts" in proc.stdout


def test_failed_run_names_its_step_and_no_secret_is_kept(fresh):
    fresh.execute("UPDATE wagtailcore_site SET hostname = 'wrong.example' WHERE is_default_site")
    assert inv("verify", "local").returncode == 1
    listing = inv("runs.list", check=True).stdout.splitlines()
    last = listing[-1].split()
    assert last[1:3] == ["verify", "local"] and last[4] == "failed" and listing[-1].endswith("verify local")
    shown = inv("runs.show", last[0], check=True).stdout
    assert "failed at verify local" in shown and "verify-local.txt" in shown
    password = (ROOT / ".sandbox" / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]
    for path in runs_dir().rglob("*"):
        if path.is_file():
            assert password not in path.read_text(errors="replace"), path


def test_unknown_run_and_environment_get_one_line(sandbox_env):
    for args, message in ((["runs.show", "nope"], "no run nope"), (["verify", "prod"], "unknown environment")):
        proc = inv(*args)
        assert proc.returncode == 1 and len(error_lines(proc)) == 1 and message in proc.stderr


def test_verify_writes_nothing(sandbox_env, connect):
    """Verification reads: it must not move the write counters the push guard compares."""
    import time

    counters = ("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables")
    before = connect("staging").execute(counters).fetchone()[0]
    inv("verify", "staging")  # whatever it finds
    time.sleep(1.2)  # statistics reach the shared counters within a second
    assert connect("staging").execute(counters).fetchone()[0] == before


def test_verify_never_migrates_the_database_the_app_names_itself(fresh, sandbox_env, tmp_path):
    """The app's settings read DATABASE_URL, and the inventory says they read another
    variable: the scratch URL would go unread, and `migrate` would run on the local database."""
    before = fingerprint(fresh)
    proc = subprocess.run(
        ["ansible-playbook", "playbooks/verify_database.yml", "--limit", "local",
         "-e", "drydock_app_database_url_env=OTHER_DATABASE_URL", "-e", f"db_verify_cache_dir={tmp_path}"],
        env=dict(ansible_env(), DATABASE_URL=sandbox_env["local"]["url"]), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "the app's settings name the database wagtail_site, not the scratch database" in proc.stdout
    assert fingerprint(fresh) == before
    assert not [name for name in databases(fresh) if "__verify_" in name]


@pytest.mark.parametrize("query", ["&dbname=wagtail_site", "&db%6Eame=wagtail_site", "&service=site"])
def test_verify_refuses_a_url_whose_parameters_name_the_database(fresh, sandbox_env, tmp_path, query):
    """The driver reads dbname= (its name decoded too) or service= over the URL's path: the
    scratch URL would still name the live database, and verify would migrate it."""
    before = fingerprint(fresh)
    proc = subprocess.run(
        ["ansible-playbook", "playbooks/verify_database.yml", "--limit", "local",
         "-e", f"drydock_app_database_url={sandbox_env['local']['url']}{query}", "-e", f"db_verify_cache_dir={tmp_path}"],
        env=ansible_env(), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "drydock_app_database_url has a dbname= or service= parameter" in proc.stdout
    assert fingerprint(fresh) == before


def test_verify_never_migrates_the_database_the_apps_options_name(fresh, sandbox_env, tmp_path):
    """The app's settings read a URL the inventory does not give (here DATABASE_URL, set
    around drydock): its path names the scratch database, its ?dbname= the live one, which
    is where Django would connect. The name the settings give is not the one that counts."""
    before = fingerprint(fresh)
    scratch = f"wagtail_site__verify_{hashlib.sha1(b'local').hexdigest()[:8]}"
    aimed = sandbox_env["local"]["url"].replace("/wagtail_site?", f"/{scratch}?") + "&dbname=wagtail_site"
    proc = subprocess.run(
        ["ansible-playbook", "playbooks/verify_database.yml", "--limit", "local",
         "-e", "drydock_app_database_url_env=OTHER_DATABASE_URL", "-e", f"db_verify_cache_dir={tmp_path}"],
        env=dict(ansible_env(), DATABASE_URL=aimed), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"the app's settings name the database wagtail_site, not the scratch database {scratch}" in proc.stdout
    assert fingerprint(fresh) == before


@pytest.mark.parametrize("variable, value", [("drydock_db_app_role", 'wagtail_site" OWNER "postgres'),
                                             ("drydock_db_name", 'scratch" TEMPLATE "wagtail_site" --'),
                                             ("drydock_db_os_user", "postgres -s")])
def test_a_name_of_the_local_host_that_could_end_its_sql_is_refused_before_anything(sandbox_env, connect, tmp_path,
                                                                                   variable, value):
    """Verifying staging builds its reference on the local host, from the local host's names:
    one that Ansible's SQL or sudo would take for more than a name is refused first."""
    inventory = sandbox_inventory_with(tmp_path, "host_vars/local.yml", {variable: value})
    for cached in (runs_dir() / "cache").glob("schema-*.json"):  # else no database would be made
        cached.unlink()
    before = databases(connect("local", "postgres"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRYDOCK_INVENTORY", str(inventory))
        proc = inv("verify", "staging")
    assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{variable} of local" in error_lines(proc)[0], error_lines(proc)[0]
    assert databases(connect("local", "postgres")) == before
