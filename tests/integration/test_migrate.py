"""The migration step on the local copy: migrate, phases, notebooks, scripts, safety snapshot."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

import drydock_pg
from drydock.journal import read_progress
from drydock.lock import stat_fields
from drydock.paths import example_site_dir, runs_dir
from drydock.playbook import ansible_env
from tests.conftest import INV, ROOT, error_lines, fingerprint, inv, owner_psql, playbook, process_tree

NOTEBOOK = ROOT / "examples" / "notebooks" / "blog_to_podcast.ipynb"
BLOG_CHILDREN = """SELECT c.id FROM wagtailcore_page c JOIN wagtailcore_page p ON left(c.path, -4) = p.path
                   WHERE p.id = %s ORDER BY c.path"""


def applied(conn, app="blog") -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM django_migrations WHERE app = %s", (app,))}


def page_type(conn, slug):
    return conn.execute("SELECT p.id, ct.model FROM wagtailcore_page p JOIN django_content_type ct"
                        " ON ct.id = p.content_type_id WHERE p.slug = %s", (slug,)).fetchall()


def tree_problems(conn) -> int:
    """Independent check of Wagtail's materialised-path tree (not drydock's module)."""
    return conn.execute("""
        SELECT (SELECT count(*) FROM wagtailcore_page WHERE depth <> length(path) / 4)
             + (SELECT count(*) FROM wagtailcore_page p WHERE numchild <>
                  (SELECT count(*) FROM wagtailcore_page c WHERE c.path LIKE p.path || '____'))
             + (SELECT count(*) FROM wagtailcore_page c WHERE depth > 1 AND NOT EXISTS
                  (SELECT 1 FROM wagtailcore_page p WHERE p.path = left(c.path, -4)))""").fetchone()[0]


AS_PRODUCTION = "as_production"


@pytest.fixture(scope="module")
def production_copy(pulled):
    """A pull of production's latest backup, saved as a snapshot: restoring it puts the
    local database back as production has it in a third of a pull's time."""
    inv("pull", "production", "--latest", check=True)
    inv("snapshot.save", AS_PRODUCTION, "--force", check=True)
    yield
    inv("snapshot.delete", AS_PRODUCTION, check=True)


@pytest.fixture
def fresh_local(production_copy):
    """The local database as production has it: blog at 0001, a Blog with posts."""
    inv("snapshot.restore", AS_PRODUCTION, check=True)
    # No connection is handed out: every step terminates the sessions on the local database.


def test_plan_shows_sql_and_applies_nothing(fresh_local, connect):
    proc = inv("migrate", "--plan", check=True)
    assert "== blog.0002_podcast" in proc.stdout and 'CREATE TABLE "blog_podcast"' in proc.stdout
    assert "Pending migrations (2): blog.0002_podcast, blog.0003_post_visible_date_index" in proc.stdout
    assert proc.stdout.rstrip().endswith("nothing was applied (inv migrate applies them)")
    assert applied(connect("local")) == {"0001_initial"}


def test_the_plan_of_a_database_never_migrated_says_to_pull_first(sandbox_env):
    """Each migration's SQL needs the ones before it applied (some read the schema): on a
    database no migration was applied to, the plan lists them and says so, in seconds."""
    local = sandbox_env["local"]
    create = subprocess.run([*owner_psql(local), "-c", "CREATE DATABASE wagtail_empty OWNER wagtail_site"],
                            capture_output=True, text=True)
    assert create.returncode == 0, create.stderr
    try:
        url = local["url"].replace("/wagtail_site?", "/wagtail_empty?")
        proc = playbook("migrate_plan.yml", "--limit", "local", "-e", "drydock_db_name=wagtail_empty",
                        "-e", f"drydock_app_database_url={url}")
        assert proc.returncode == 0, proc.stdout[-3000:]
        text = " ".join(proc.stdout.split())
        assert "No migration is applied to this database yet (was it ever pulled?)" in text, text[-2000:]
        assert "== " not in text and "Pending migrations (" in text and "blog.0001_initial" in text
    finally:
        subprocess.run([*owner_psql(local), "-c", "DROP DATABASE IF EXISTS wagtail_empty"], check=True)


def test_phases_follow_the_deploy_order(fresh_local, connect):
    inv("migrate", "--phase", "before", check=True)
    assert applied(connect("local")) == {"0001_initial", "0002_podcast"}  # 0003 is Safe.after_deploy
    inv("migrate", "--phase", "after", check=True)
    assert applied(connect("local")) == {"0001_initial", "0002_podcast", "0003_post_visible_date_index"}


def test_notebook_turns_the_blog_into_a_podcast(fresh_local, connect):
    conn = connect("local")
    (blog_id, model), = page_type(conn, "blog")
    assert model == "blog"
    posts = [row[0] for row in conn.execute(BLOG_CHILDREN, (blog_id,))]
    assert len(posts) >= 200
    proc = inv("migrate", "--notebook", str(NOTEBOOK), check=True)

    conn = connect("local")
    (podcast_id, model), = page_type(conn, "blog")  # the original slug, now a Podcast
    assert model == "podcast" and podcast_id != blog_id
    assert [row[0] for row in conn.execute(BLOG_CHILDREN, (podcast_id,))] == posts  # all, in order
    assert conn.execute("SELECT count(*) FROM wagtailcore_page WHERE id = %s", (blog_id,)).fetchone()[0] == 0
    assert tree_problems(conn) == 0
    # The sandbox runs the example site in drydock's own Python (see inventories/sandbox).
    check = subprocess.run([sys.executable, "manage.py", "migrate", "--check"], cwd=example_site_dir(),
                           capture_output=True, text=True, env=dict(os.environ, DATABASE_URL=_url()))
    assert check.returncode == 0, check.stdout + check.stderr

    executed = Path(proc.stdout.split("executed notebook: ")[1].split()[0])
    assert executed.is_file() and executed.parent.parent == runs_dir()
    for private in (executed, executed.parent / "ansible.log", executed.parent / "journal.jsonl",  # they show data
                    executed.parent / "parameters.yml"):  # the notebook's database URL and --param values
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    outputs = "".join(o.get("text", "") for c in nbformat.read(executed, 4).cells for o in c.get("outputs", []))
    assert f"with {len(posts)} posts" in outputs

    again = inv("migrate", "--notebook", str(NOTEBOOK))  # a second run refuses cleanly
    assert again.returncode == 1 and "is a Podcast already" in error_lines(again)[-1]
    assert page_type(connect("local"), "blog") == [(podcast_id, "podcast")]


def _url() -> str:
    return json.loads((ROOT / ".sandbox" / "env.json").read_text())["local"]["url"]


def test_failing_cell_puts_the_database_back(fresh_local, connect, tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import django\ndjango.setup()\nfrom blog.models import Post"),
        nbformat.v4.new_code_cell("Post.objects.filter(pk__in=list(Post.objects.values_list('pk', flat=True)[:10])).delete()"),
        nbformat.v4.new_code_cell("raise ValueError('stop here on purpose')"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    before = fingerprint(connect("local"))
    proc = inv("migrate", "--no-migrate", "--notebook", str(path))
    assert proc.returncode == 1
    line = error_lines(proc)[-1]
    # Cell 3 of the notebook is In [4] in the executed one: papermill injects the parameters first.
    assert "in cell In [4]" in line and "ValueError: stop here on purpose" in line and "put back" in line
    assert fingerprint(connect("local")) == before


def test_script_runs_in_the_apps_python(fresh_local, connect, tmp_path):
    script = tmp_path / "tag.py"
    script.write_text("import django\ndjango.setup()\nfrom taggit.models import Tag\nTag.objects.create(name='drydock', slug='drydock')\n"
                      "print('tagged', Tag.objects.count(), 'in all')\n")
    proc = inv("migrate", "--script", str(script), check=True)
    assert "tagged" in proc.stdout and "in all" in proc.stdout  # what the script printed is shown
    assert connect("local").execute("SELECT count(*) FROM taggit_tag WHERE slug = 'drydock'").fetchone()[0] == 1


def test_a_script_that_exits_non_zero_says_why_and_is_put_back(fresh_local, connect, tmp_path):
    """A script that prints its reason and exits (no traceback on stderr): the line gives what
    it printed last and its exit status, and the database is put back."""
    script = tmp_path / "refuse.py"
    script.write_text("import sys\nprint('checked 7 rows')\nprint('refusing: 2 rows have no slug')\nsys.exit(3)\n")
    before = fingerprint(connect("local"))
    proc = inv("migrate", "--script", str(script))
    assert proc.returncode == 1
    assert "failed: refusing: 2 rows have no slug (exit 3); the local database was put back" in error_lines(proc)[-1], \
        error_lines(proc)[-1]
    assert fingerprint(connect("local")) == before


def test_a_step_whose_put_back_fails_too_says_why_the_step_failed(fresh_local, sandbox_env, tmp_path):
    """The put-back's failure alone would hide the step's: the line gives both, then the way
    back, as the database may be half-changed."""
    script = tmp_path / "fail_and_lose_the_snapshot.py"
    drop = [*owner_psql(sandbox_env["local"]), "-c", "DROP DATABASE wagtail_site__snap_before_step"]
    script.write_text(f"import subprocess, sys\nsubprocess.run({drop!r}, check=True)\n"
                      "print('refusing: on purpose')\nsys.exit(3)\n")
    proc = inv("migrate", "--no-migrate", "--script", str(script))
    assert proc.returncode == 1
    line = error_lines(proc)[-1]
    assert "Run the script failed: refusing: on purpose (exit 3); putting the local database back from snapshot" \
           " before_step failed too: " in line, line
    assert line.endswith("may have left the local database half-changed; put it back with `inv snapshot.restore"
                         " before_step` (or pull again)"), line
    refused = inv("migrate")  # the mark stays
    assert refused.returncode == 1 and "did not finish" in error_lines(refused)[-1]


def probe_notebook(folder: Path, parameter: str) -> Path:
    """A notebook that writes the value it got for `parameter` to the file its parameter `out` names."""
    parameters = nbformat.v4.new_code_cell(f"{parameter} = ''\nout = ''")
    parameters.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=[
        parameters, nbformat.v4.new_code_cell(f"with open(out, 'w') as handle:\n    handle.write({parameter})")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(notebook, folder / "probe.ipynb")
    return folder / "probe.ipynb"


def test_a_path_or_parameter_that_looks_like_a_template_is_taken_as_it_is(fresh_local, tmp_path):
    """Ansible renders a string from -e as Jinja when a task uses it: a file named
    `tag{{ 7*7 }}.py` must run as itself, not as tag49.py (nor any lookup run on the way),
    and a notebook's `--param` (nested in the parameters' dict) must arrive as typed."""
    for name, says in (("tag{{ 7*7 }}.py", "the script named with braces"), ("tag49.py", "the rendered name")):
        (tmp_path / name).write_text(f"print({says!r} + ' ran')\n")
    proc = inv("migrate", "--no-migrate", "--script", str(tmp_path / "tag{{ 7*7 }}.py"), check=True)
    assert "the script named with braces ran" in proc.stdout and "the rendered name ran" not in proc.stdout
    out = tmp_path / "probe.txt"
    inv("migrate", "--no-migrate", "--notebook", str(probe_notebook(tmp_path, "probe")), "--param", "probe={{ 7*7 }}",
        "--param", f"out={out}", check=True)
    assert out.read_text() == "{{ 7*7 }}"


def test_plain_ansible_cannot_hand_the_notebook_another_database(fresh_local, tmp_path):
    """drydock's own parameters win over django_migrate_parameters: the notebook works on the
    database the step's checks and its safety snapshot cover, whatever a -e says."""
    out = tmp_path / "probe.txt"
    elsewhere = "postgresql://wagtail_site@127.0.0.1:55432/elsewhere"
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps({
        "django_migrate_parameters": {"database_url": elsewhere, "out": str(out)},
        "django_migrate_notebook": str(probe_notebook(tmp_path, "database_url")), "django_migrate_migrate": False,
        "django_migrate_output_dir": str(tmp_path / "run")}))
    proc = playbook("migrate.yml", "--limit", "local", "-e", f"@{vars_file}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert out.read_text() == _url()


def test_fixtree_that_cannot_repair_an_orphan_fails_the_step_and_puts_it_back(fresh_local, connect):
    """fixtree mends counts, never an orphan page: the tree is checked again after it, and a
    step that would report the tree consistent on a broken one fails instead."""
    connect("local").execute("UPDATE wagtailcore_page SET path = left(path, -8) || 'ZZZZ' || right(path, 4)"
                             " WHERE id = (SELECT max(id) FROM wagtailcore_page WHERE numchild = 0 AND depth > 2)")
    before = fingerprint(connect("local"))
    try:
        proc = inv("migrate", "--fixtree")
        assert proc.returncode == 1
        assert "orphan" in error_lines(proc)[-1] and "put back" in error_lines(proc)[-1], error_lines(proc)[-1]
        assert fingerprint(connect("local")) == before and applied(connect("local")) == {"0001_initial"}
    finally:
        inv("snapshot.restore", AS_PRODUCTION, check=True)  # put back means with its orphan: not for the tests after


@pytest.mark.parametrize("playbook_name, env, setting, message", [
    ("migrate.yml", "local", "django_migrate_python=/nonexistent/python", "no such file: /nonexistent/python"),
    ("verify_database.yml", "staging", "drydock_app_dir=/nonexistent",
     "no such file: /nonexistent/manage.py (drydock_app_dir, drydock_app_python)"),
    ("pull_database.yml", "local", "drydock_dump=/nonexistent/site.dump.zst",
     "no such file: /nonexistent/site.dump.zst (the local database is unchanged)"),
])
def test_a_missing_file_the_inventory_names_is_the_error_line_not_the_loops_summary(sandbox_env, tmp_path, playbook_name,
                                                                                    env, setting, message):
    """The check of the app's files is a loop, whose own message is "One or more items
    failed": the line drydock ends with must name the missing file."""
    failures = tmp_path / "failures.jsonl"
    proc = subprocess.run(["ansible-playbook", f"playbooks/{playbook_name}", "--limit", env, "-e", setting],
                          env=dict(ansible_env(), DRYDOCK_FAILURES_FILE=str(failures)), cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert json.loads(failures.read_text().splitlines()[-1])["msg"] == message  # the last: drydock's line


def test_the_step_never_saves_its_snapshot_over_the_pulls(pulled, connect, tmp_path):
    """pre_pull holds the database the last pull replaced: a step told to save under that
    name (plain ansible-playbook, or the inventory for `inv migrate`) would overwrite it."""
    kept = drydock_pg.database_oid(connect("local", "postgres"), "wagtail_site__snap_pre_pull")
    failures = tmp_path / "failures.jsonl"
    proc = subprocess.run(["ansible-playbook", "playbooks/migrate.yml", "--limit", "local", "-e",
                           "django_migrate_snapshot=pre_pull"],
                          env=dict(ansible_env(), DRYDOCK_FAILURES_FILE=str(failures)), cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert json.loads(failures.read_text().splitlines()[-1])["msg"] == (
        "django_migrate_snapshot cannot be pre_pull: that snapshot holds the database the last pull replaced, which "
        "the step's save would overwrite; name another (before_step by default)")
    assert kept is not None and drydock_pg.database_oid(connect("local", "postgres"), "wagtail_site__snap_pre_pull") == kept


def test_broken_page_tree_fails_the_step_unless_fixtree(fresh_local, connect):
    connect("local").execute("UPDATE wagtailcore_page SET numchild = numchild + 7 WHERE slug = 'blog'")
    before = fingerprint(connect("local"))
    proc = inv("migrate")
    assert proc.returncode == 1 and "numchild does not match its children" in error_lines(proc)[-1]
    # The migrations that ran before the check are undone with the rest: put back from before_step.
    assert "put back" in error_lines(proc)[-1]
    assert error_lines(proc)[-1].endswith("; run the step with --fixtree (ansible-playbook: -e django_migrate_fixtree=true)"
                                          " to have manage.py fixtree repair the tree")
    assert applied(connect("local")) == {"0001_initial"} and fingerprint(connect("local")) == before
    inv("migrate", "--fixtree", check=True)
    assert tree_problems(connect("local")) == 0


@pytest.mark.parametrize("form", ["user:password@", "?password=", "&sslpassword=", "?pass%77ord="])
def test_a_database_url_with_a_password_is_refused_before_anything_runs(fresh_local, connect, sandbox_env, tmp_path,
                                                                       form):
    """Ansible hands a command's environment to it on its command line, which the process
    list shows: the app's URL must hold no password (a passfile does). Both the migration
    step and verify's reference build refuse one, in one line that does not repeat it."""
    password = "s3cret-in-the-url"
    base = f"postgresql://wagtail_site@{sandbox_env['local']['host']}:55432/wagtail_site"
    url = {"user:password@": base.replace("wagtail_site@", f"wagtail_site:{password}@", 1),
           "?password=": f"{base}?password={password}",
           "&sslpassword=": f"{base}?sslmode=disable&sslpassword={password}",
           "?pass%77ord=": f"{base}?pass%77ord={password}"}[form]  # libpq decodes the name: password=
    before = fingerprint(connect("local"))
    out = tmp_path / "run"
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps({"django_migrate_database_url": url, "drydock_app_database_url": url,
                                     "django_migrate_notebook": str(NOTEBOOK), "django_migrate_output_dir": str(out)}))
    for name in ("migrate.yml", "migrate_plan.yml", "verify_database.yml"):
        proc = playbook(name, "--limit", "local", "-e", f"@{vars_file}")
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "drydock_app_database_url holds a password" in proc.stdout, proc.stdout[-2000:]
        assert password not in proc.stdout + proc.stderr
    assert not out.exists()  # no notebook ran, no parameters were written
    assert fingerprint(connect("local")) == before


NAMES_ANOTHER = "drydock_app_database_url must name the database wagtail_site"
PARAMETER_NAMES_ONE = "drydock_app_database_url has a dbname= or service= parameter"


@pytest.mark.parametrize("url, refusal", [
    ("postgresql://wagtail_site@127.0.0.1/another", NAMES_ANOTHER),
    ("postgresql://wagtail_site@127.0.0.1/another?application_name=/wagtail_site", NAMES_ANOTHER),
    ("postgresql://wagtail_site@127.0.0.1/wagtail_site?dbname=another", PARAMETER_NAMES_ONE),
    ("postgresql://wagtail_site@127.0.0.1/wagtail_site?db%6Eame=another", PARAMETER_NAMES_ONE)])
def test_a_database_url_naming_another_database_is_refused(fresh_local, connect, tmp_path, url, refusal):
    """The step's safety snapshot is of the local database: a URL naming another one would be
    migrated with nothing to put it back from (its name elsewhere in the URL does not count,
    and the driver reads a dbname= parameter, its name decoded, over the path)."""
    before = fingerprint(connect("local"))
    proc = playbook("migrate.yml", "-e", f"@{_vars_file(tmp_path, url)}")
    assert proc.returncode != 0
    assert refusal in proc.stdout
    assert fingerprint(connect("local")) == before


def test_an_app_whose_settings_connect_elsewhere_is_refused(fresh_local, connect, sandbox_env):
    """The inventory's URL names the local database, but the app's settings read another
    variable (here DATABASE_URL, set around drydock), whose ?dbname= names another database:
    Django would migrate that one, which the step's safety snapshot does not cover."""
    before = fingerprint(connect("local"))
    proc = subprocess.run(["ansible-playbook", "playbooks/migrate.yml", "-e", "drydock_app_database_url_env=OTHER_DATABASE_URL"],
                          env=dict(ansible_env(), DATABASE_URL=sandbox_env["local"]["url"] + "&dbname=postgres"),
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "the app's settings would connect to postgres, not to wagtail_site, whose safety snapshot" in proc.stdout
    assert fingerprint(connect("local")) == before


def test_an_app_url_that_reaches_a_database_of_that_name_on_another_server_is_refused(fresh_local, connect,
                                                                                      sandbox_env, tmp_path):
    """Production's host and port in the local app's URL, by mistake: same database name, so
    every check of names passes, but the step would change production and put back a local
    database it never touched."""
    before, production_before = fingerprint(connect("local")), fingerprint(connect("production"))
    proc = playbook("migrate.yml", "-e", f"@{_vars_file(tmp_path, sandbox_env['production']['url'])}")
    assert proc.returncode != 0
    assert "the app's settings reach a database wagtail_site on another server than the local cluster" in proc.stdout
    assert fingerprint(connect("production")) == production_before and fingerprint(connect("local")) == before


def test_a_variable_name_that_is_a_command_is_refused(fresh_local, connect, sandbox_env, tmp_path):
    """The variable's name reaches the app's command line unquoted: a name holding a command
    would run it."""
    before = fingerprint(connect("local"))
    planted = tmp_path / "planted"
    proc = playbook("migrate.yml", "-e", f"@{_vars_file(tmp_path, sandbox_env['local']['url'])}",
                    "-e", f"django_migrate_database_url_env='DATABASE_URL=x; touch {planted}; X'")
    assert proc.returncode != 0
    assert "drydock_app_database_url_env must be an environment variable's name" in proc.stdout
    assert not planted.exists()
    assert fingerprint(connect("local")) == before


def _vars_file(tmp_path, url) -> Path:
    path = tmp_path / "vars.json"
    path.write_text(json.dumps({"django_migrate_database_url": url}))
    return path


def test_an_interrupted_step_is_put_back_before_anything_else(fresh_local, connect, tmp_path):
    """Ctrl-C in the middle of a step: the playbook cannot put the database back, so drydock
    says so, and migrate and push refuse until a snapshot restore (or a pull) has."""
    before = fingerprint(connect("local"))
    script = tmp_path / "slow_step.py"
    script.write_text("import time\ntime.sleep(300)\n")
    # Migrated, then stopped in the script: schema and page tree as verify wants them.
    command = [*INV, "migrate", "--script", str(script)]
    proc = subprocess.Popen(command, env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # The step's own process (`python SCRIPT`), not inv, whose command line names the script too.
        step = f"python[0-9.]* {script}$"
        while subprocess.run(["pgrep", "-f", step], capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the step never started"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole group
        _, stderr = proc.communicate(timeout=120)
    finally:
        subprocess.run(["pkill", "-f", f"python[0-9.]* {script}$"])
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("drydock: error: interrupted during migrate: the local database may")
    refused = inv("migrate")
    assert refused.returncode == 1 and "did not finish" in error_lines(refused)[-1]
    assert "inv snapshot.restore before_step" in error_lines(refused)[-1]
    pushed = inv("push", "staging")
    assert pushed.returncode == 1 and "refusing to push the local database to staging" in error_lines(pushed)[-1]
    checked = inv("verify", "local")  # its checks pass: the schema is whole, the data perhaps not
    assert checked.returncode == 1 and "live database: wagtail_site" in checked.stdout  # its report, shown
    assert error_lines(checked)[-1].startswith("drydock: error: local passed its checks, but the migration step script")
    connect("local").execute("CREATE TABLE drift_by_hand (id int)")
    drifted = inv("verify", "local")  # a check that fails says what the mark means too
    assert drifted.returncode == 1 and "drift_by_hand" in error_lines(drifted)[-1]
    assert error_lines(drifted)[-1].endswith("may have left the local database half-changed; put it back with "
                                             "`inv snapshot.restore before_step` (or pull again)")
    connect("local").execute("DROP TABLE drift_by_hand")
    for args in (("snapshot.delete", "before_step"), ("snapshot.save", "before_step", "--force")):
        kept = inv(*args)  # the only whole copy from before the step
        assert kept.returncode == 1 and "before_step" in error_lines(kept)[-1], args
    half = inv("snapshot.save", "half_changed")  # it would come back later as if it were whole
    assert half.returncode == 1 and "refusing to save snapshot half_changed" in error_lines(half)[-1]
    assert "half_changed" not in inv("snapshot.list", check=True).stdout
    half_changed = fingerprint(connect("local"))
    try:
        # A pull keeps the half-changed database as snapshot pre_pull: undoing the pull brings
        # it back with its mark, not as a database that looks whole.
        pulled = inv("pull", "production", "--latest", check=True)
        assert "did not finish on: restoring snapshot pre_pull brings it back with that mark" in pulled.stdout
        listed = inv("snapshot.list", check=True).stdout
        assert "pre_pull: holds the database the migration step script slow_step.py of run " in listed
        restored = inv("snapshot.restore", "pre_pull", check=True)
        assert fingerprint(connect("local")) == half_changed
        assert "; but the migration step script slow_step.py of run " in restored.stdout
        pushed = inv("push", "staging")
        assert pushed.returncode == 1 and "refusing to push the local database to staging" in error_lines(pushed)[-1]
        inv("snapshot.restore", "before_step", check=True)
        assert fingerprint(connect("local")) == before
        inv("migrate", "--phase", "before", check=True)  # no longer refused
    finally:
        for mark in (runs_dir() / "locks").glob("local.unfinished-step*.json"):
            mark.unlink()  # never left for other tests


def _runs_ansible_playbook(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # ended meanwhile
        return False
    return len(argv) > 1 and argv[1].endswith(b"/ansible-playbook")


@pytest.mark.parametrize("killed", ["ansible-playbook", "ansible-playbook and its workers"])
def test_a_step_whose_ansible_is_killed_says_the_database_may_be_half_changed(fresh_local, connect, tmp_path, killed):
    """ansible-playbook killed outright (the OOM killer, say; or `pkill -9`, its workers with
    it) in the middle of a step: drydock is not interrupted, but the step did not finish, and
    its line says what that means. The step's script, which Ansible no longer stops, is
    stopped before the lock is released: it cannot write into a database restored meanwhile."""
    before = fingerprint(connect("local"))
    script = tmp_path / "slow_step.py"
    script.write_text("import time\ntime.sleep(300)\n")
    step = f"python[0-9.]* {script}$"
    proc = subprocess.Popen([*INV, "migrate", "--script",
                             str(script)], env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(["pgrep", "-f", step], capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the step never started"
            time.sleep(0.5)
        # ansible-playbook is inv's child; its workers, forks of it, are its children.
        playbooks = [pid for pid, _ in process_tree(proc.pid) if _runs_ansible_playbook(pid)]
        for pid in playbooks:
            if killed != "ansible-playbook" or int(stat_fields(pid)[1]) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
        left = subprocess.run(["pgrep", "-f", step], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["pkill", "-f", step])
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        assert len(playbooks) >= 2 and proc.returncode == 1
        assert left == "", f"the step's script still runs after inv returned: PID {left}"
        # Nor is Ansible's scratch of the killed ansible-playbook left in ~/.ansible/tmp.
        ansible_tmp = Path.home() / ".ansible" / "tmp"
        assert not [entry for pid in playbooks for entry in ansible_tmp.glob(f"ansible-local-{pid}*")
                    if len(entry.name) == len(f"ansible-local-{pid}") + 8]  # mkdtemp's 8 random characters
        assert "==> waiting for the " in stdout and "of the task that did not finish to stop" in stdout
        assert stderr.strip().splitlines()[-1].endswith(
            "did not finish and may have left the local database half-changed; put it back with "
            "`inv snapshot.restore before_step` (or pull again)")
        inv("snapshot.restore", "before_step", check=True)
        assert fingerprint(connect("local")) == before
    finally:
        for mark in (runs_dir() / "locks").glob("local.unfinished-step*.json"):
            mark.unlink()  # never left for other tests


def test_a_step_interrupted_before_its_snapshot_says_nothing_changed(fresh_local, connect, sandbox_env):
    """Ctrl-C before the safety snapshot is taken: the database is unchanged and nothing
    refuses the next step. Advice to restore before_step would be wrong there: that snapshot
    is an older step's, perhaps from before the pull this step was to migrate. The snapshot is
    held at the lock every snapshot action takes first (this test holds it; the preflight's
    own connections before it are not held), and the Ctrl-C comes once its task has begun."""
    before = fingerprint(connect("local"))
    holder = subprocess.Popen(owner_psql(sandbox_env["local"], "postgres", "-A", "-t"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def ask(sql: str) -> str:
        holder.stdin.write(sql + "\n")
        holder.stdin.flush()
        return holder.stdout.readline().strip()

    def snapshot_started(runs: set[Path]) -> bool:
        """The safety snapshot's task has begun in this test's run: held at its first connection."""
        return any((entry.get("action"), entry.get("event")) == ("drydock_snapshot", "start")
                   for folder in set(runs_dir().glob("*-migrate")) - runs for entry in read_progress(folder) or [])

    proc = None
    try:
        assert ask("SELECT 'held' FROM pg_advisory_lock(hashtextextended('drydock-snapshots:wagtail_site', 0));") == "held"
        earlier_runs = set(runs_dir().glob("*-migrate"))
        proc = subprocess.Popen([*INV, "migrate"],
                                env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 180
        while not snapshot_started(earlier_runs):
            assert proc.poll() is None and time.monotonic() < deadline, "the step never began its safety snapshot"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        holder.communicate("", timeout=60)  # its session ends, and the lock with it
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        "drydock: error: interrupted during migrate: the step had not begun changing the local database (its safety "
        "snapshot comes first): it is unchanged")
    assert not (runs_dir() / "locks" / "local.unfinished-step.json").exists()
    assert fingerprint(connect("local")) == before
    inv("migrate", "--phase", "before", check=True)  # nothing refuses it
