"""drydock's Invoke tasks: a thin Collection over the drydock package. Run them with ./inv."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

from invoke import Collection, Exit, task

from drydock import workflow
from drydock.errors import DrydockError
from drydock.paths import project_root
from drydock.sandbox import Sandbox, SandboxError, bulk_posts_for
from drydock.validate import InvalidInput, count


def one_line_errors(body):
    """Turn drydock's expected failures into one line on stderr and exit status 1."""
    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except (DrydockError, InvalidInput, SandboxError) as error:
            raise Exit(f"drydock: error: {error}", code=1) from None
    return wrapper


@task(help={"env": "the environment to back up (exactly one, e.g. production)",
            "keep": "how many fetched dumps of that environment to keep (default 5)"})
@one_line_errors
def backup(c, env, keep=None):
    """Dump ENV's database on its host, verify it, fetch it with a manifest to backups/ENV/."""
    workflow.backup(env, keep=keep)


@task(help={"env": "the environment to pull from (e.g. production)",
            "dump": "restore this fetched dump instead of taking a new backup",
            "latest": "restore the newest dump already fetched from ENV"})
@one_line_errors
def pull(c, env, dump=None, latest=False):
    """Back up ENV and restore it into the local database (side database, checks, swap)."""
    workflow.pull(env, dump_path=dump, latest=latest)


@task(help={"env": "where to change the Site (local, staging, production)",
            "hostname": "the new hostname, e.g. localhost",
            "port": "the new port (default 443)",
            "site_name": "change the Site with this site_name instead of the default Site"})
@one_line_errors
def site(c, env, hostname, port=443, site_name=""):
    """Set the hostname and port of ENV's Wagtail Site (and django_site)."""
    workflow.site(env, hostname, port, site_name)


@task(help={"scale": "production's size: 'small' (default, ~15 MB, for tests), 'bench' (~1 GB) or a size in MB",
            "posts": "how many blog posts to create through Wagtail (default 220)"})
@one_line_errors
def sandbox_up(c, scale="small", posts=220):
    """Start the sandbox: production, staging and local clusters under .sandbox/ (idempotent)."""
    Sandbox().up(posts=count(posts, "--posts"), bulk_posts=bulk_posts_for(scale))


@task
@one_line_errors
def sandbox_down(c):
    """Stop exactly the sandbox's own processes (by PID) and delete .sandbox/."""
    Sandbox().down()


@task
@one_line_errors
def demo(c):
    """Run the demo on the sandbox: sandbox up, pull production, turn its Blog into a Podcast."""
    Sandbox().up()
    workflow.pull("production")
    workflow.migrate(notebook=str(project_root() / "examples" / "notebooks" / "blog_to_podcast.ipynb"))


@task(help={"pytest_args": "extra arguments for pytest, e.g. '-k pull -x'"})
def test(c, pytest_args=""):
    """Run the whole test suite (ansible-lint, unit, integration on the sandbox)."""
    command = [sys.executable, "-m", "pytest", *pytest_args.split()]
    code = subprocess.run(command, cwd=project_root(), env=dict(os.environ)).returncode
    if code != 0:
        raise Exit(code=code)


@task
def lint(c):
    """Run ansible-lint (production profile) on the playbooks and roles."""
    code = subprocess.run(["ansible-lint", "playbooks", "roles"],
                          cwd=project_root()).returncode
    if code != 0:
        raise Exit(code=code)


@task(iterable=["param"], auto_shortflags=False,
      help={"notebook": "execute this notebook with papermill after migrating",
            "script": "run this Python script after migrating",
            "param": "a notebook parameter, name=value (repeatable)",
            "plan": "show the pending migrations and their SQL; apply nothing",
            "phase": "all (default), before (only what is safe before the code deploy) or after",
            "fixtree": "repair the page tree with fixtree when the check finds problems",
            "migrate": "run manage.py migrate first (default); --no-migrate runs only the notebook or script"})
@one_line_errors
def migrate(c, notebook=None, script=None, param=None, plan=False, phase="all", fixtree=False, migrate=True):
    """Migrate the local database with the app's own code, then a notebook or script; undone on failure."""
    workflow.migrate(notebook=notebook, script=script, plan=plan, phase=phase, parameters=param or [],
                     fixtree=fixtree, run_migrate=migrate)


@task(help={"name": "snapshot name (lower-case letters, digits and _)",
            "force": "replace an existing snapshot of that name"})
@one_line_errors
def snapshot_save(c, name, force=False):
    """Snapshot the local database (a template copy: seconds, whatever the size)."""
    workflow.snapshot("save", name, force=force)


@task(help={"name": "the snapshot to bring back"})
@one_line_errors
def snapshot_restore(c, name):
    """Put the local database back at snapshot NAME (the replaced one is kept as <db>__previous)."""
    workflow.snapshot("restore", name)


@task
@one_line_errors
def snapshot_list(c):
    """List the local snapshots with their database, size and age."""
    workflow.snapshot("list")


@task(help={"name": "the snapshot to delete"})
@one_line_errors
def snapshot_delete(c, name):
    """Delete snapshot NAME."""
    workflow.snapshot("delete", name)


snapshot = Collection("snapshot")
snapshot.add_task(snapshot_save, name="save")
snapshot.add_task(snapshot_restore, name="restore")
snapshot.add_task(snapshot_list, name="list")
snapshot.add_task(snapshot_delete, name="delete")

sandbox = Collection("sandbox")
sandbox.add_task(sandbox_up, name="up")
sandbox.add_task(sandbox_down, name="down")

namespace = Collection(backup, pull, migrate, site, demo, test, lint, sandbox, snapshot)
