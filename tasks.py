"""drydock's Invoke tasks: a thin Collection over the drydock package. Run them with ./inv."""
from __future__ import annotations

import functools
import inspect
import os
import shlex
import signal
import subprocess

import invoke
from invoke import Collection, Exit

from drydock import paths, testrun, workflow
from drydock.errors import DrydockError, Interrupted
from drydock.paths import project_root
from drydock.playbook import sandbox_inventory_only
from drydock.sandbox import Sandbox, SandboxError, bulk_posts_for
from drydock.validate import InvalidInput, count

paths.no_world_writable_files()

# No short flags: Invoke would make one from each option's first letter (`push -l` for
# --allow-unscrubbed, `site -h` for --hostname rather than help); long names say what they do.
task = functools.partial(invoke.task, auto_shortflags=False)

# Numeric options have string defaults: given an int default, Invoke converts the value
# itself and answers `--port abc` with a traceback. drydock.validate converts and checks
# them instead, with a one-line error.

# A run stopped by Ctrl-C exits as a shell reports a command that SIGINT stopped.
INTERRUPTED_EXIT = 128 + signal.SIGINT
# Tasks that record no steps in runs/: stopped, they have no run to look up there.
RECORD_NO_STEPS = {"sandbox_up", "sandbox_down", "bench", "test", "runs_list", "runs_show", "snapshot_list"}


def stop_as_on_ctrl_c(signum, _frame) -> None:
    """SIGTERM (a `timeout`, a cancelled CI job) and SIGHUP (the terminal or the SSH session
    gone) stop a run as Ctrl-C does: ansible-playbook is stopped, an app the run stopped is
    started again, the lock released, the journal told; by default Python would just die.
    After a hang-up there is no terminal to write to, and a write there would fail the
    clean-up: its line goes only to the journal (inv runs.show)."""
    if signum == signal.SIGHUP:
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, 1)
        os.dup2(nowhere, 2)
    raise KeyboardInterrupt


def one_line_errors(body):
    """Turn drydock's expected failures into one line on stderr and exit status 1; a run
    stopped by Ctrl-C (or SIGTERM, or SIGHUP) exits 130, as a shell reports a command that
    SIGINT stopped."""
    positional = [name for name, parameter in inspect.signature(body).parameters.items()
                  if parameter.default is inspect.Parameter.empty][1:]  # after the context

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        # Invoke gives a task's positional argument whatever token comes next, --help included.
        given = dict(zip(positional, args[1:]), **{name: kwargs[name] for name in positional if name in kwargs})
        if any(value in ("--help", "-h") for value in given.values()):
            raise Exit("drydock: error: --help after a task is read as its argument: "
                       "put it before the task's name (./inv --help TASK)", code=1)
        for stop in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(stop, stop_as_on_ctrl_c)
        try:
            paths.refuse_unfit_folders()
            return body(*args, **kwargs)
        except Interrupted as error:
            raise Exit(f"drydock: error: {error}", code=INTERRUPTED_EXIT) from None
        except (DrydockError, InvalidInput, SandboxError) as error:
            raise Exit(f"drydock: error: {error}", code=1) from None
        except KeyboardInterrupt:  # outside a step (a step says what it left): nothing had begun
            hint = "" if body.__name__ in RECORD_NO_STEPS else " (see inv runs.list for the steps that ran)"
            raise Exit(f"drydock: error: interrupted{hint}", code=INTERRUPTED_EXIT) from None
    return wrapper


@task(help={"env": "the environment to back up (exactly one, e.g. production)",
            "keep": "how many fetched dumps of that environment to keep (default 5)"})
@one_line_errors
def backup(c, env, keep=None):
    """Dump ENV's database on its host, verify it, fetch it with a manifest to backups/ENV/."""
    workflow.backup(env, keep=keep)


@task(help={"env": "the environment to pull from (e.g. production)",
            "dump": "restore this fetched dump (or the backup folder holding it) instead of taking a new backup",
            "latest": "restore the newest dump already fetched from ENV"})
@one_line_errors
def pull(c, env, dump=None, latest=False):
    """Back up ENV and restore it into the local database (side database, checks, swap)."""
    workflow.pull(env, dump_path=dump, latest=latest)


@task(help={"env": "where to change the Site (local, staging, production)",
            "hostname": "the new hostname, e.g. localhost",
            "port": "the new port (default: the environment's drydock_site_port, e.g. 8000 for local, 443 for a server)",
            "site_name": "change the Site with this site_name instead of the default Site",
            "yes": "confirm for a protected environment without a prompt"})
@one_line_errors
def site(c, env, hostname, port="", site_name="", yes=False):
    """Set the hostname and port of ENV's Wagtail Site (and django_site)."""
    workflow.site(env, hostname, port, site_name, yes=yes)


@task(help={"scale": "production's size: 'small' (default, ~15 MB, for tests), 'bench' (~1 GB) or a size in MB",
            "posts": "how many blog posts to create through Wagtail (default 220); both apply when the sandbox is built"})
@one_line_errors
def sandbox_up(c, scale=None, posts=None):
    """Start the sandbox: production, staging and local clusters under .sandbox/ (idempotent)."""
    Sandbox().up(posts=None if posts is None else count(posts, "--posts"),
                 bulk_posts=None if scale is None else bulk_posts_for(scale))


@task
@one_line_errors
def sandbox_down(c):
    """Stop exactly the sandbox's own processes (by PID) and delete .sandbox/."""
    Sandbox().down()


@task
@one_line_errors
def demo(c):
    """The whole workflow on the sandbox: production → local → Blog to Podcast → staging, then show it."""
    sandbox_inventory_only()
    box = Sandbox()
    box.up()
    # The notebook turns the Blog into a Podcast: it would fail on anything else, after the backup and the pull.
    kind = box.blog_kind("production")
    if kind != "blog":
        found = "a Podcast already (a migrated copy was pushed there)" if kind == "podcast" else f"not one Blog ({kind!r})"
        raise DrydockError(f"production's blog is {found}, and the demo turns a Blog into a Podcast: "
                           "./inv sandbox.down && ./inv sandbox.up builds a fresh sandbox")
    workflow.pipeline("production", "staging",
                      notebook=str(project_root() / "examples" / "notebooks" / "blog_to_podcast.ipynb"))
    workflow.show_page("staging", "/blog/")


@task(help={"scale": "production's size: 'bench' (default, ~1 GB) or a size in MB",
            "runs": "alternating runs of each measurement, at most; medians are reported (default 3)",
            "minutes": "start a run only if it would end within this many minutes in all (default 20; 0: no limit)"})
@one_line_errors
def bench(c, scale="bench", runs="3", minutes="20"):
    """Time drydock against the hand-written runbook on the sandbox; write bench/results/."""
    from bench.run import main

    sandbox_inventory_only()
    main(scale=scale, runs=count(runs, "--runs"), minutes=count(minutes, "--minutes", minimum=0))


@task(help={"pytest_args": "extra arguments for pytest, e.g. '-k pull -x' (naming test files runs them in one shard)",
            "shards": "how many pytest processes run side by side, each on its own sandbox (default 2; 1 = plain pytest)"})
@one_line_errors
def test(c, pytest_args="", shards="2"):
    """Run the whole test suite (ansible-lint, pyflakes, unit, integration on the sandbox)."""
    sandbox_inventory_only()
    code = testrun.run(project_root(), shlex.split(pytest_args), count(shards, "--shards"))
    if code != 0:
        raise Exit(code=code)


@task
def lint(c):
    """Run ansible-lint (production profile) on the playbooks and roles, pyflakes on the Python."""
    codes = [subprocess.run(command, cwd=project_root()).returncode for command in (testrun.ANSIBLE_LINT, testrun.PYFLAKES)]
    if any(codes):
        raise Exit(code=1)


@task(help={"env": "the environment to push to (exactly one, e.g. staging)",
            "dump": "push this dump (or the backup folder holding it, with its manifest) instead of dumping the local database",
            "yes": "confirm a push to a protected environment (production) without a prompt",
            "allow_lost_writes": "push even though the target took writes since the copy's backup (they are lost)",
            "allow_unscrubbed": "with --dump: push an unscrubbed dump to an unprotected environment (personal data goes along)",
            "allow_older_schema": "push a copy that lacks Django migrations the target has applied (its code expects them)"})
@one_line_errors
def push(c, env, dump=None, yes=False, allow_lost_writes=False, allow_unscrubbed=False, allow_older_schema=False):
    """Restore the local copy onto ENV: checks, safety backup, side database, swap, health check."""
    workflow.push(env, dump_path=dump, yes=yes, allow_lost_writes=allow_lost_writes, allow_unscrubbed=allow_unscrubbed,
                  allow_older_schema=allow_older_schema)


@task(help={"env": "the environment to roll back (e.g. staging)",
            "yes": "confirm for a protected environment without a prompt",
            "allow_lost_writes": "roll a protected environment back although it took writes since its database was swapped in "
                                 "(they are set aside in DB__previous, which the next push drops)",
            "allow_failed_check": "bring back DB__previous although a swap-back set it aside as it failed its check "
                                  "(the check itself was wrong)"})
@one_line_errors
def rollback(c, env, yes=False, allow_lost_writes=False, allow_failed_check=False):
    """Swap ENV's previous database back in (seconds, whatever the size); run again to undo."""
    workflow.rollback(env, yes=yes, allow_lost_writes=allow_lost_writes, allow_failed_check=allow_failed_check)


@task(help={"env": "the environment whose app to restart (exactly one, e.g. staging)",
            "yes": "confirm a restart on a protected environment (production) without a prompt"})
@one_line_errors
def app_restart(c, env, yes=False):
    """Restart ENV's app (stop, start, health check): e.g. after an interrupted push left it stopped."""
    workflow.restart_app(env, yes=yes)


@task(iterable=["param"],
      help={"source": "where the data comes from (e.g. production)",
            "target": "where the migrated copy goes (e.g. staging)",
            "notebook": "execute this notebook in the migration step",
            "param": "a notebook parameter, name=value (repeatable)",
            "script": "run this script in the migration step",
            "yes": "confirm a push to a protected environment without a prompt",
            "allow_lost_writes": "push even though the target took writes since the backup",
            "allow_older_schema": "push although the target has applied Django migrations the local code lacks "
                                  "(its code is being rolled back too)"})
@one_line_errors
def pipeline(c, source, target, notebook=None, script=None, param=None, yes=False, allow_lost_writes=False,
             allow_older_schema=False):
    """backup SOURCE → pull → migrate (+ notebook or script) → verify local → push to TARGET → verify it, with a timing summary."""
    workflow.pipeline(source, target, notebook=notebook, script=script, parameters=param or [], yes=yes,
                      allow_lost_writes=allow_lost_writes, allow_older_schema=allow_older_schema)


@task(help={"env": "the environment to verify (local, staging, production)",
            "manifest": "also check every table's row count against this manifest.json"})
@one_line_errors
def verify(c, env, manifest=None):
    """Check ENV's database against the code (migrations, schema drift, page tree, Site, row counts); say where it came from."""
    workflow.verify(env, manifest=manifest)


@task(help={"last": "how many of the newest runs to list (20; 0 lists them all)"})
@one_line_errors
def runs_list(c, last="20"):
    """List the runs in runs/: the environments each touched, its outcome and, unless ok, the step it ended at."""
    workflow.runs_list(last=last)


@task(help={"run_id": "a run's id, as inv runs.list shows it"})
@one_line_errors
def runs_show(c, run_id):
    """Show one run's steps, timings, sizes, failure and files."""
    workflow.runs_show(run_id)


@task(iterable=["param"],
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
            "force": "replace an existing snapshot of that name",
            "ready-copy": "keep a ready copy beside it, so that a restore is a rename (on by default: "
                          "--no-ready-copy saves the disk it takes, as much as the snapshot)"})
@one_line_errors
def snapshot_save(c, name, force=False, ready_copy=True):
    """Snapshot the local database (a template copy: seconds, whatever the size)."""
    workflow.snapshot("save", name, force=force, ready_copy=ready_copy)


@task(help={"name": "the snapshot to bring back"})
@one_line_errors
def snapshot_restore(c, name):
    """Put the local database back at snapshot NAME (the replaced one is kept as DB__previous)."""
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

runs = Collection("runs")
runs.add_task(runs_list, name="list")
runs.add_task(runs_show, name="show")

app = Collection("app")
app.add_task(app_restart, name="restart")

sandbox = Collection("sandbox")
sandbox.add_task(sandbox_up, name="up")
sandbox.add_task(sandbox_down, name="down")

namespace = Collection(backup, pull, migrate, push, rollback, pipeline, verify, site, demo, test, lint, bench, sandbox,
                       snapshot, runs, app)
