"""The whole workflow in one command, as the demo runs it: production → local → Podcast → staging."""
import urllib.request

from tests.conftest import ROOT, inv

NOTEBOOK = ROOT / "examples" / "notebooks" / "blog_to_podcast.ipynb"


def test_pipeline_puts_the_podcast_on_staging(sandbox_env, connect):
    proc = inv("pipeline", "production", "staging", "--notebook", str(NOTEBOOK))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
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
    from tests.conftest import error_lines, fingerprint

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
    from tests.conftest import error_lines, fingerprint

    before = {env: fingerprint(connect(env)) for env in ("local", "production")}
    staging_backups = sorted((backups_dir() / "staging").glob("*")) if (backups_dir() / "staging").exists() else []
    proc = inv("pipeline", "staging", "production", "--yes")
    assert proc.returncode == 1
    assert "refusing to push to production a copy of staging's data" in error_lines(proc)[-1]
    assert {env: fingerprint(connect(env)) for env in ("local", "production")} == before
    now = sorted((backups_dir() / "staging").glob("*")) if (backups_dir() / "staging").exists() else []
    assert now == staging_backups
