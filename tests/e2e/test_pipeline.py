"""The whole workflow in one command: the demo's production → local → Podcast → staging, and what it
leaves when a check fails before or after the push."""
import threading
import urllib.request

import nbformat
import psycopg

from drydock import journal
from drydock.paths import runs_dir
from tests.conftest import ROOT, app_serves, database_url, error_lines, fingerprint, interrupted_when, inv

NOTEBOOK = ROOT / "examples" / "notebooks" / "blog_to_podcast.ipynb"


NEWER_MIGRATION = "INSERT INTO django_migrations (app, name, applied) VALUES ('blog', '9999_from_newer_code', now())"
NEWER_MIGRATION_RECORDED = "SELECT count(*) FROM django_migrations WHERE name = '9999_from_newer_code'"


def test_pipeline_puts_the_podcast_on_staging_and_passes_its_options_on(sandbox_env, connect):
    """The demo's pipeline, with staging as if it ran newer code than the checkout: without
    --allow-older-schema passed on to the push, this run would fail (test_push checks that
    refusal). One pipeline for both: each takes a minute."""
    connect("staging").execute(NEWER_MIGRATION)
    try:
        proc = inv("pipeline", "production", "staging", "--notebook", str(NOTEBOOK), "--param", "note=from_the_pipeline",
                   "--allow-older-schema")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert connect("staging").execute(NEWER_MIGRATION_RECORDED).fetchone()[0] == 0  # the pushed copy is live
        assert connect("staging", "wagtail_site__previous").execute(NEWER_MIGRATION_RECORDED).fetchone()[0] == 1
    finally:  # never leave staging ahead of the code for the tests after this one, nor a rollback of it
        for database in (None, "wagtail_site__previous"):
            connect("staging", database).execute("DELETE FROM django_migrations WHERE name = '9999_from_newer_code'")
    executed = nbformat.read(sorted(runs_dir().glob("*-pipeline"))[-1] / NOTEBOOK.name, as_version=4)
    assert any('note = "from_the_pipeline"' in cell.source for cell in executed.cells)  # the --param reached it
    summary = proc.stdout.split("pipeline production → staging done")[1]
    for step in ("backup", "pull", "migrate", "verify local", "dump local", "restore", "verify staging"):
        assert step in summary
    assert "[7/7] verify staging" in proc.stdout  # progress: steps done of total
    conn = connect("staging")
    assert conn.execute("SELECT ct.model FROM wagtailcore_page p JOIN django_content_type ct"
                        " ON ct.id = p.content_type_id WHERE p.slug = 'blog'").fetchone()[0] == "podcast"
    with urllib.request.urlopen(f"http://{sandbox_env['staging']['host']}:8000/blog/", timeout=10) as response:
        html = response.read().decode()
    assert response.status == 200 and "The Drydock Log" in html and html.count("<li>") >= 200
    assert '<p class="kind">Podcast · Technology</p>' in html  # served by the Podcast's template


def test_pipeline_stops_before_the_push_when_the_local_copy_fails_verification(sandbox_env, connect, tmp_path):
    script = tmp_path / "by_hand.py"
    script.write_text("import django\ndjango.setup()\nfrom django.db import connection\n"
                      "with connection.cursor() as c:\n"
                      "    c.execute(\"INSERT INTO django_migrations (app, name, applied) VALUES ('blog', '0099_by_hand', now())\")\n")
    before = fingerprint(connect("staging"))
    proc = inv("pipeline", "production", "staging", "--script", str(script))
    assert proc.returncode == 1
    assert "migration blog.0099_by_hand: recorded in django_migrations but not in the code" in error_lines(proc)[-1]
    assert fingerprint(connect("staging")) == before
    assert "onto staging" not in proc.stdout and "==> dumping the local database" not in proc.stdout


def test_pipeline_from_an_unprotected_source_to_production_is_refused_before_anything(sandbox_env, connect):
    from drydock.paths import backups_dir

    before = {env: fingerprint(connect(env)) for env in ("local", "production")}
    staging_backups = sorted((backups_dir() / "staging").glob("*")) if (backups_dir() / "staging").exists() else []
    proc = inv("pipeline", "staging", "production", "--yes")
    assert proc.returncode == 1
    assert "refusing to push to production a copy of staging's data" in error_lines(proc)[-1]
    assert {env: fingerprint(connect(env)) for env in ("local", "production")} == before
    now = sorted((backups_dir() / "staging").glob("*")) if (backups_dir() / "staging").exists() else []
    assert now == staging_backups


OID = "SELECT oid FROM pg_database WHERE datname = 'wagtail_site'"
SESSION_KEY = "written-after-the-swap"


class WriteAfterTheSwap(threading.Thread):
    """Waits until a swap has put another database under the live name on `env`, then writes
    one session row into it, as a user of the new site would: the pushed copy then no longer
    matches its manifest (the pipeline's verification fails), and the target has taken a
    write since the push."""

    def __init__(self, sandbox_env, env: str):
        super().__init__(daemon=True)
        self.admin_url = database_url(sandbox_env, env, "postgres")
        self.live_url = database_url(sandbox_env, env)
        with psycopg.connect(self.admin_url) as admin:
            self.original_oid = admin.execute(OID).fetchone()[0]
        self.written_to = None
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            while not self.stop.wait(0.02):
                oid = admin.execute(OID).fetchone()
                if oid and oid[0] != self.original_oid:
                    break
            else:
                return
        with psycopg.connect(self.live_url, autocommit=True) as live:  # closed at once: its counters are sent
            live.execute("INSERT INTO django_session (session_key, session_data, expire_date)"
                         " VALUES (%s, 'x', now() + interval '1 day')", (SESSION_KEY,))
        self.written_to = oid[0]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=10)


def test_pipeline_rolls_staging_back_when_it_fails_verification_after_the_push(sandbox_env, connect):
    before = fingerprint(connect("staging"))
    with WriteAfterTheSwap(sandbox_env, "staging") as writer:
        proc = inv("pipeline", "production", "staging")
    assert writer.written_to is not None, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 1
    line = error_lines(proc)[-1]
    assert "row counts" in line and "django_session" in line, line
    assert line.endswith("(the push was rolled back: staging runs its previous database; inv rollback refuses to put"
                         " the pushed copy live again unless --allow-failed-check)"), line
    assert connect("staging", "postgres").execute(OID).fetchone()[0] == writer.original_oid
    assert fingerprint(connect("staging")) == before
    assert app_serves(sandbox_env, "staging")
    # The copy that failed verification is named so, and a plain rollback does not bring it back.
    refused = inv("rollback", "staging")
    assert refused.returncode == 1
    assert ("wagtail_site__previous is the database swapped back out at " in error_lines(refused)[-1]
            and " as it failed its check (inv verify staging failed after the push: " in error_lines(refused)[-1]), \
        error_lines(refused)[-1]
    assert connect("staging", "postgres").execute(OID).fetchone()[0] == writer.original_oid


def test_ctrl_c_during_the_pipelines_rollback_says_what_it_left_and_starts_the_app_again(sandbox_env, connect):
    """The rollback after a failed verify, interrupted once it has begun to stop staging's
    app: the line says whether its exchange ran, and the app serves again (it was left
    stopped, the line only "interrupted during rollback staging")."""
    earlier = set(runs_dir().glob("*-pipeline"))

    def rollback_stopping_the_app() -> bool:
        for run in set(runs_dir().glob("*-pipeline")) - earlier:
            try:
                began = any(step["step"] == "rollback staging" for step in journal.read(run))
                stops = [event for event in journal.read_progress(run) or [] if event.get("host") == "staging"
                         and event.get("event") == "start"
                         and str(event.get("task", "")).startswith("app_service : Stop the app")]
            except ValueError:  # a line caught half written
                return False
            return began and len(stops) >= 2  # the push's stop, then the rollback's
        return False

    with WriteAfterTheSwap(sandbox_env, "staging") as writer:
        line = interrupted_when(rollback_stopping_the_app, "pipeline", "production", "staging")
    assert writer.written_to is not None
    assert line.startswith("drydock: error: interrupted during rollback staging: the exchange "), line
    assert ", and its app, stopped before the interruption, was restarted and passed its health check" in line, line
    assert app_serves(sandbox_env, "staging")
    # Whichever database is live, the other is the one to go back to: staging ends as before.
    if connect("staging", "postgres").execute(OID).fetchone()[0] != writer.original_oid:
        assert line.endswith("; that is the pipeline's pushed copy, which failed verification: inv rollback staging"
                             " brings back the database from before the push") or "exchange may have run" in line, line
        inv("rollback", "staging", check=True)
    assert connect("staging", "postgres").execute(OID).fetchone()[0] == writer.original_oid
    assert app_serves(sandbox_env, "staging")


def test_pipeline_never_rolls_back_a_protected_target_that_took_writes_since_the_push(sandbox_env, connect):
    """The automatic rollback would set production's new write aside: it is refused, the
    pushed database stays live with the write, and the message says how to roll back anyway."""
    before = fingerprint(connect("production"))
    with WriteAfterTheSwap(sandbox_env, "production") as writer:
        proc = inv("pipeline", "production", "production", "--yes")
    assert writer.written_to is not None, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 1
    line = error_lines(proc)[-1]
    assert "row counts" in line and "django_session" in line, line
    assert ("(not rolled back: refusing to roll back production: it has taken writes since it was swapped in"
            " (django_session (+1))") in line, line
    assert line.endswith("; to roll back anyway: inv rollback production --allow-lost-writes"), line
    assert connect("production", "postgres").execute(OID).fetchone()[0] == writer.written_to
    assert connect("production").execute("SELECT count(*) FROM django_session WHERE session_key = %s",
                                         (SESSION_KEY,)).fetchone()[0] == 1
    assert app_serves(sandbox_env, "production")
    # What the message says brings back production as it was before the pipeline.
    inv("rollback", "production", "--yes", "--allow-lost-writes", check=True)
    assert connect("production", "postgres").execute(OID).fetchone()[0] == writer.original_oid
    assert fingerprint(connect("production")) == before
    assert app_serves(sandbox_env, "production")


def test_ctrl_c_during_the_last_verify_keeps_the_pushed_copy_live_and_rolls_nothing_back(sandbox_env, connect):
    """A verify stopped by hand is not a failed check: the pipeline must not roll the push back."""
    old = connect("staging", "postgres").execute(OID).fetchone()[0]
    earlier = set(runs_dir().glob("*-pipeline"))

    def steps() -> list[dict]:
        return [step for run in set(runs_dir().glob("*-pipeline")) - earlier for step in journal.read(run)]

    held: list = []  # [holder, watcher] once the push is done and the verify is held

    def verify_held() -> bool:
        """Once the push's restore is done (the pushed copy live, the verify not yet begun), lock
        django_migrations, which the verify's schema step reads: the Ctrl-C then lands while the
        verify waits, however fast it would otherwise have finished."""
        if not held:
            try:
                pushed = any(step["step"] == "restore" and step["outcome"] == "ok" for step in steps())
            except ValueError:  # a journal line caught half written
                return False
            if not pushed:
                return False
            held.extend([connect("staging", autocommit=False), connect("staging")])
            held[0].execute("LOCK TABLE django_migrations IN ACCESS EXCLUSIVE MODE")
        return held[1].execute("SELECT count(*) FROM pg_locks WHERE NOT granted"
                               " AND relation = 'django_migrations'::regclass"
                               " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                               ).fetchone()[0] > 0

    try:
        line = interrupted_when(verify_held, "pipeline", "production", "staging")
    finally:
        for conn in held:  # the lock goes with its session
            conn.close()
    assert line.startswith("drydock: error: interrupted during verify staging: verify only reads staging: nothing changed"), line
    # ...about the verify alone: the line says what the pipeline had done by then.
    assert line.endswith("; the pipeline's push before it had put its copy live on staging, unchecked: inv verify staging,"
                         " and inv rollback staging if that fails"), line
    assert connect("staging", "postgres").execute(OID).fetchone()[0] != old  # the pushed copy is still live
    assert not [step for step in steps() if step["step"].startswith("rollback")]
    assert app_serves(sandbox_env, "staging")
    inv("verify", "staging", check=True)  # no lock left behind; the pushed copy passes on its own


def test_the_demo_refuses_a_production_whose_blog_is_a_podcast_already_before_anything(sandbox_env, connect):
    """As after a push of the demo's result to production: its notebook would fail, after a backup and a pull."""
    production = connect("production")
    as_built = production.execute("SELECT content_type_id FROM wagtailcore_page WHERE slug = 'blog'").fetchone()[0]
    before = {env: fingerprint(connect(env)) for env in ("local", "staging")}
    production.execute("UPDATE wagtailcore_page SET content_type_id = (SELECT id FROM django_content_type"
                       " WHERE app_label = 'blog' AND model = 'podcast') WHERE slug = 'blog'")
    try:
        proc = inv("demo")
    finally:
        connect("production").execute("UPDATE wagtailcore_page SET content_type_id = %s WHERE slug = 'blog'",
                                      (as_built,))
    assert proc.returncode == 1
    assert error_lines(proc) == ["drydock: error: production's blog is a Podcast already (a migrated copy was pushed "
                                 "there), and the demo turns a Blog into a Podcast: ./inv sandbox.down && "
                                 "./inv sandbox.up builds a fresh sandbox"]
    assert "==> " not in proc.stdout  # no step began
    assert {env: fingerprint(connect(env)) for env in ("local", "staging")} == before
