"""The bodies of drydock's Invoke tasks: glue around the playbooks (choosing the dump,
the run journal, progress and summaries). Everything a playbook needs to be safe lives
in the playbook, so plain `ansible-playbook` runs are just as safe."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from drydock import dumps, inventory, unfinished
from drydock.dumps import Dump
from drydock.errors import DrydockError, HostUnreachable, Interrupted
from drydock.journal import Run, began, read
from drydock.lock import LOCAL as LOCAL_LOCK, target_lock
from drydock.paths import backups_dir
from drydock.playbook import run_playbook
from drydock.validate import (InvalidInput, app_database_url, count as valid_count, hostname as valid_hostname,
                              port as valid_port, snapshot_name as valid_snapshot_name)

Say = Callable[[str], None]


def _keep_artifact(run: Run, path: Path, name: str | None = None) -> None:
    target = run.dir / (name or path.name)
    # 0600 from its first byte (a manifest names production's tables and counts), never
    # through a link left in its place.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as out, path.open("rb") as source:
        shutil.copyfileobj(source, out)


def _run_dumping(playbook: str, *, limit: str, run: Run, extra_vars: dict, optional: bool = False) -> Dump | None:
    """Run a playbook that makes a backup, and load the dump it made (with `optional`, None
    if it made none): the dump this run wrote, never the newest folder, which may be
    another run's."""
    made = None
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=run.folder()) as scratch:  # see run_playbook
        record = Path(scratch) / "dump.json"
        try:
            run_playbook(playbook, limit=limit, run=run, extra_vars={**extra_vars, "pg_backup_record": str(record)})
        finally:  # interrupted too: the dump may be whole already
            if record.exists():
                made = Path(json.loads(record.read_text())["dump"])
                run.fetched.append(made)
    if made:
        return dumps.load(made)
    if optional:
        return None
    raise DrydockError(f"{playbook} ended without fetching a dump")


def _fetched_into(run: Run, folder: Path) -> Path | None:
    """The last dump this run fetched into a backup folder of `folder` (backups/<env>, or
    its safety/), whole, if any."""
    made = [path for path in run.fetched if path.resolve().parent.parent == folder.resolve()]
    return made[-1] if made else None


def _backup_interrupted(run: Run, env: str) -> str:
    made = _fetched_into(run, backups_dir() / env)
    if made:
        return f"{env} is unchanged; the backup was fetched whole before the interruption: {made}"
    # Ansible's end does not stop a dump already running on the host: it may still finish there.
    return (f"{env} is unchanged; a dump already started on its host may still finish there, unfetched (the host's "
            f"rotation deletes it in time), and the next backup deletes the unfinished one here")


def backup(env_text: str, keep: int | str | None = None, say: Say = print, run: Run | None = None,
           locked: bool = False) -> Dump:
    env = inventory.load().server(env_text)
    # The playbook writes where this layer will look for the dump.
    extra = {"pg_backup_controller_dir": str(backups_dir())}
    if keep is not None:
        extra["pg_backup_keep"] = valid_count(keep, "--keep")
    run = run or Run("backup", route=[env])
    # The environment's lock: a backup's rotation tidies what interrupted runs left, never a
    # running one's work.
    with _locks([] if locked else [env], "backup", say), \
            run.step("backup", env=env, interrupted=lambda: _backup_interrupted(run, env)) as step:
        say(f"==> backing up {env}")
        dump = _run_dumping("backup_database.yml", limit=env, extra_vars=extra, run=run)
        step.update(dump=str(dump.path), bytes=dump.manifest["dump"]["size"], rows=dump.total_rows)
    _keep_artifact(run, dump.path.parent / "manifest.json", f"manifest-{env}.json")
    say(f"backup of {env}: {dump.path} ({dump.manifest['dump']['size']:,} bytes, "
        f"{len(dump.manifest['row_counts'])} tables, {dump.total_rows:,} rows, sha256 {dump.manifest['dump']['sha256'][:12]}…)")
    return dump


def pull(env_text: str, dump_path: str | None = None, latest: bool = False, say: Say = print,
         run: Run | None = None, locked: bool = False) -> Dump:
    refuse_empty(dump=dump_path)
    if dump_path and latest:
        raise InvalidInput("give --dump PATH or --latest, not both")
    inv = inventory.load()
    env = inv.server(env_text)
    shared = run is not None
    local = inv.local_env()
    run = run or Run("pull", route=[env, local])
    target = inv.hostvars[local]
    # The local database's lock first: a pull refused by it must not have taken a backup.
    with _locks([] if locked else [LOCAL_LOCK], "pull", say):
        if dump_path:
            dump = dumps.load(Path(dump_path))
        elif latest:
            dump = dumps.latest(env)
        else:
            dump = backup(env, say=say, run=run)
        if dump.source_env != env:
            raise DrydockError(f"{dump.path} is a dump of {dump.source_env}, not of {env}")
        with run.step("pull", env=local, dump=str(dump.path), bytes=dump.manifest["dump"]["size"], rows=dump.total_rows,
                      interrupted=lambda: _pull_interrupted(run, local, dump)):
            say(f"==> restoring {dump.path.name} into the local database (from {dump.path.parent})")
            run_playbook("pull_database.yml", limit=local, extra_vars={"drydock_dump": str(dump.path)}, run=run)
        # After the step, once, under the lock: an interrupt in between leaves the mark on the
        # pulled database (a false alarm) rather than moving it twice, the second time losing it.
        replaced, half_changed = _pulled_over(run, local)
    say(f"local database {target['drydock_db_name']} now holds {env}'s {dump.kind} of {dump.manifest['created']} "
        f"(a dump of {dump.manifest['dump']['size']:,} bytes): "
        f"{len(dump.manifest['row_counts'])} tables, {dump.total_rows:,} rows, all counts equal to the manifest; "
        f"Site {_site_address(target)}; "
        + (f"the local database it replaced is now snapshot pre_pull ({target['drydock_db_name']}__snap_pre_pull; "
           f"inv snapshot.restore pre_pull brings it back)" if replaced else
           "there was no local database to replace: snapshot pre_pull was left as it was")
        + (_kept_half_changed(half_changed) if half_changed else ""))
    if not shared:
        say(run.summary())
    return dump


def _kept_half_changed(mark: dict) -> str:
    return (f" (the one the migration step {mark.get('step', '?')} of run {mark.get('run', '?')} did not finish on: "
            f"restoring snapshot {unfinished.PRE_PULL} brings it back with that mark, and migrate, push and "
            f"snapshot.save refuse it)")


def _site_address(hostvars: dict) -> str:
    """The environment's Site as drydock_site stores it: the hostname lower-cased, as Wagtail matches it."""
    return f"{str(hostvars['drydock_site_hostname']).lower()}:{hostvars['drydock_site_port']}"


def site(env_text: str, hostname: str, port: int | str = "", site_name: str = "", yes: bool = False,
         say: Say = print) -> None:
    hostname = valid_hostname(hostname)
    if port != "":
        port = valid_port(port)
    inv = inventory.load()
    env = inv.environment(env_text)
    if port == "":  # the port the environment's Site has after a pull or push
        port = valid_port(inv.hostvars[env].get("drydock_site_port", 443))
    protected = inv.protected(env)
    confirm(env, protected, yes, "change the Site of")
    run = Run("site", route=[env])
    lock = inv.lock_name(env)
    with _locks([lock], "site", say), run.step("site", env=env, hostname=hostname, port=port,
                                               interrupted=lambda: _site_interrupted(run, env, hostname, port)):
        run_playbook("site_hostname.yml", limit=env, run=run, extra_vars={
            "wagtail_site_hostname": hostname, "wagtail_site_port": port, "wagtail_site_name": site_name,
            "drydock_confirm": env if protected else ""})
    before = run.task_account(env, "drydock_site")
    say(f"{env}: Site {site_name or '(default)'} is now {hostname}:{port}" + (f" ({before})" if before else ""))


def _site_interrupted(run: Run, env: str, hostname: str, port: int) -> str:
    """Whether an interrupted `inv site` changed the Site, from its module's progress (the
    change is one transaction: all of it or none)."""
    state = _events_state(run, run.task_events(env, "drydock_site"))
    if state == "ran":
        return f"the Site of {env} was set to {hostname}:{port} before the interruption"
    if state == "not run":
        return f"the Site of {env} is unchanged (its change had not begun, or failed and was undone)"
    return (f"the Site of {env} is either unchanged or {hostname}:{port}, never half of each (one transaction): "
            f"run the command again to be sure")


def snapshot(action: str, name: str = "", force: bool = False, ready_copy: bool = True,
             say: Say = print) -> list[dict] | None:
    """save / restore / delete a snapshot of the local database, or list them.

    No inventory read here (ansible-inventory takes half a second, a third of a restore):
    snapshot.yml targets drydock_local itself and refuses more than one host, and the local
    database's lock has a fixed name. Save, restore and delete take that lock: while a pull,
    a migration step, a push's dump or a pipeline runs, they refuse instead of changing the
    database under it."""
    if action != "list":
        valid_snapshot_name(name)
    if inventory.sandbox_down():  # before a run folder, and Ansible's lines before the same one
        raise DrydockError("the sandbox is down: run ./inv sandbox.up first")
    extra = {"pg_snapshot_action": action, "pg_snapshot_name": name, "pg_snapshot_force": force,
             "pg_snapshot_ready_copy": ready_copy}
    if action == "list":
        snapshots = _module_result(run_playbook("snapshot.yml", extra_vars=extra, capture=True), "snapshots")
        say(format_snapshots(snapshots))
        held = unfinished.read(snapshot=unfinished.PRE_PULL)
        if held is not None and any(snap["name"] == unfinished.PRE_PULL for snap in snapshots):
            say(f"{unfinished.PRE_PULL}: holds the database the migration step {held.get('step', '?')} of run "
                f"{held.get('run', '?')} did not finish, perhaps half-changed; once it is restored, migrate, push and "
                "snapshot.save refuse it")
        return snapshots
    run = Run(f"snapshot-{action}", route=[LOCAL_LOCK])  # the local database, whatever its host's name
    with target_lock(LOCAL_LOCK, f"snapshot {action}", say):
        mark = unfinished.read()
        if action == "delete" and mark is not None and mark.get("snapshot", "before_step") == name:
            # The only whole copy of the local database from before the unfinished step.
            raise unfinished.refusal(f"delete snapshot {name}", mark)
        if action == "save" and mark is not None:
            # A half-changed database saved would come back later as if it were whole.
            raise unfinished.refusal(f"save snapshot {name}", mark)
        with run.step(f"snapshot {action}", snapshot=name,
                      interrupted=lambda: _snapshot_interrupted(run, action, name)) as step:
            if action != "restore":
                run_playbook("snapshot.yml", extra_vars=extra, run=run)
                if action == "delete":
                    unfinished.snapshot_deleted(name)  # a mark that went with the database it held
            else:  # captured, to tell whether the restore was a rename; it takes a second or two
                say(f"==> restoring snapshot {name}")
                results = run_playbook("snapshot.yml", extra_vars=extra, run=run, capture=True)
                used, error = _module_result(results, "ready_copy_used"), _module_result(results, "ready_copy_error")
                database_s = _module_result(results, "database_s")
                database = _module_result(results, "snapshot").split("__snap_")[0]  # <db>__snap_<name>
                step.update(ready_copy_used=used, database_s=database_s)
                half_changed = unfinished.restored(name)  # whole again, unless the snapshot holds a half-changed one
    if action == "save":
        say(f"saved snapshot {name} of the local database"
            + ("; its ready copy is being made in the background" if ready_copy else ""))
    elif action == "restore":
        how = f"swapped in its ready copy in {database_s:.2f} s, the next one is being made in the background" if used else \
            f"copied it in {database_s:.2f} s: it had no ready copy" + (f"; making one failed: {error}" if error else "")
        say(f"the local database is back at snapshot {name} ({how}; the one it replaced is kept as {database}__previous "
            f"until the next snapshot restore, a failed migration step's included, drops it)"
            + (f"; but {unfinished.left_half_changed(half_changed)}" if half_changed else ""))
    else:
        say(f"deleted snapshot {name}")
    return None


def _module_result(results: dict, key: str):
    """`key` from the one task result that has it (snapshot.yml runs on one host)."""
    return next(r[key] for host in results.values() for r in host.values() if key in r)


def format_snapshots(snapshots: list[dict], now: datetime | None = None) -> str:
    from drydock.journal import table

    if not snapshots:
        return "no snapshots"
    now = now or datetime.now(timezone.utc)
    rows = []
    for snap in snapshots:
        rows.append({"name": snap["name"], "of database": snap["source"],
                     "size": f"{snap['size'] / 1048576:.1f} MB", "age": _age(snap.get("created"), now),
                     "ready copy": "yes" if snap.get("ready") else "failed" if snap.get("ready_copy_error") else "no"})
    failures = [f"{snap['name']}: making its ready copy failed: {snap['ready_copy_error']}"
                for snap in snapshots if snap.get("ready_copy_error") and not snap.get("ready")]
    return "\n".join([table(rows, ["name", "of database", "size", "age", "ready copy"]), *failures])


def _age(created, now: datetime) -> str:
    """How long ago `created` (an ISO time with its offset, from a database's comment) was, or
    "?": any database whose name holds __snap_ is listed, and its comment may be anyone's."""
    try:
        seconds = (now - datetime.fromisoformat(created)).total_seconds()
    except (TypeError, ValueError):  # none, not a string, not ISO, or without an offset
        return "?"
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h" if seconds >= 3600 \
        else f"{seconds / 60:.0f} min"


def _local_database() -> str:
    """The local database's name, read from the inventory only for a line that names it (a
    snapshot command does not read it otherwise)."""
    try:
        inv = inventory.load()
        return str(inv.hostvars[inv.local[0]]["drydock_db_name"])
    except (DrydockError, InvalidInput, KeyError, IndexError, ValueError, OSError):  # this line is no place to fail
        return "<db>"


def _snapshot_state(run: Run) -> str:
    """Whether the step's one snapshot module ran (_events_state of its events): "ran", "not
    run", "running" or "unknown" (tasks ran, but no progress was recorded)."""
    progress = run.progress()
    return _events_state(run, None if progress is None else
                         [entry["event"] for entry in progress if entry.get("action") == "drydock_snapshot"])


# What a snapshot command that did not run left.
SNAPSHOTS_UNCHANGED = "the local database and its snapshots are unchanged"


def _snapshot_interrupted(run: Run, action: str, name: str,
                          local_database: Callable[[], str] = _local_database) -> str:
    """What an interrupted save, restore or delete left: its one module either ran or not
    (a restore is a rename, a save a copy renamed in: never half of either)."""
    state = _snapshot_state(run)
    if state == "unknown":
        return f"whether the {action} ran cannot be told (no task progress was recorded): {_snapshot_tells(action)}"
    if state == "ran":
        done = {"save": f"snapshot {name} was saved (its ready copy, made in the background, may not be there yet: "
                        f"`inv snapshot.list` says; a restore without it copies the snapshot)",
                "restore": f"the local database is back at snapshot {name}; the one it replaced is kept as ",
                "delete": f"snapshot {name} was deleted"}[action]
        if action == "restore":
            half_changed = unfinished.restored(name)  # first: what follows reads the inventory (a second)
            done += f"{local_database()}__previous"
            if half_changed:
                done += f"; but {unfinished.left_half_changed(half_changed)}"
        elif action == "delete":
            unfinished.snapshot_deleted(name)
        return f"the {action} ran: {done}"
    if state == "not run":
        return f"the {action} did not run: {SNAPSHOTS_UNCHANGED}"
    return f"the {action} may have run, whole or not at all: {_snapshot_tells(action)}"


def _killed_snapshot_account(run: Run, action: str, name: str) -> str:
    """For a snapshot command killed in its step (it wrote no line of its own), whether its
    one module ran, told from the progress Ansible reported. Read only: inv runs.show changes
    nothing (an unfinished step's mark is settled by the next command)."""
    state = _snapshot_state(run)
    if state == "ran":
        return f"local: the {action} of snapshot {name} ran"
    if state == "not run":
        return f"local: the {action} of snapshot {name} did not run: {SNAPSHOTS_UNCHANGED}"
    return f"local: the {action} of snapshot {name} may have run, whole or not at all: {_snapshot_tells(action)}"


def _snapshot_tells(action: str) -> str:
    """Which command tells whether an interrupted snapshot step ran: a save or a delete shows
    in the list; a restore in the local database's own record."""
    if action == "restore":
        return "`inv verify local` says which (its live database line ends `by a snapshot restore of <name>` if it did)"
    return "`inv snapshot.list` says which"


PHASES = ("all", "before", "after")


def _has_row_counts(manifest: Path) -> bool:
    """What verify reads of a manifest: its row counts, each table's a number."""
    try:
        counts = json.loads(manifest.read_text())["row_counts"]
        return isinstance(counts, dict) and all(isinstance(rows, int) for rows in counts.values())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def refuse_empty(**paths: str | None) -> None:
    """An option given an empty value (`--dump "$DUMP"` with DUMP unset) is a mistake, never
    "no option": a push would dump the local database instead, a migration skip its notebook."""
    for option, value in paths.items():
        if value is not None and not value.strip():
            raise InvalidInput(f"--{option} was given an empty path")


# The parameters drydock itself gives every notebook (roles/django_migrate/tasks/notebook.yml).
RESERVED_PARAMETERS = ("database_url", "site_hostname", "site_port")


def parse_parameters(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`key=value` pairs for a notebook; keys must be Python identifiers, each given once, and
    not one of drydock's own (a notebook pointed at another database by a typo)."""
    parameters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise InvalidInput(f"invalid notebook parameter {pair!r}: use name=value")
        if key in RESERVED_PARAMETERS:
            raise InvalidInput(f"--param {key} is set by drydock (from the inventory): choose another name")
        if key in parameters:
            raise InvalidInput(f"--param {key} is given twice")
        parameters[key] = value
    return parameters


def check_step_inputs(notebook: str | None, script: str | None, phase: str = "all",
                      parameters: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Refuse the migration step's bad inputs before anything runs (a pipeline checks them
    before its backup and pull); returns the notebook's parameters."""
    refuse_empty(notebook=notebook, script=script)
    if notebook and script:
        raise InvalidInput("give --notebook or --script, not both")
    if phase not in PHASES:
        raise InvalidInput(f"invalid --phase {phase!r}: use all, before or after")
    if parameters and not notebook:
        raise InvalidInput("--param sets a notebook's parameters: give --notebook with it")
    for path in (notebook, script):
        if path and not Path(path).is_file():
            raise InvalidInput(f"{'a folder, not a file' if Path(path).is_dir() else 'no such file'}: {path}")
    if notebook:
        refuse_unreadable_notebook(notebook)
    return parse_parameters(parameters)


def refuse_unreadable_notebook(path: str) -> None:
    """A notebook papermill cannot read would fail the step only after manage.py migrate and
    the safety snapshot, which the failure then puts back: refuse it first."""
    import nbformat

    try:
        nbformat.read(path, as_version=4)
    except OSError as error:
        raise InvalidInput(f"cannot read the notebook {path}: {error.strerror or type(error).__name__}") from None
    except Exception as error:  # noqa: BLE001 - nbformat raises JSON and validation errors alike
        # Its type only: nbformat's message quotes the file, which may not be a notebook at all (a passfile).
        raise InvalidInput(f"{path} is not a notebook papermill can read ({type(error).__name__})") from None


def migrate(notebook: str | None = None, script: str | None = None, plan: bool = False, phase: str = "all",
            parameters: list[str] | tuple[str, ...] = (), fixtree: bool = False, run_migrate: bool = True,
            say: Say = print, run: Run | None = None, locked: bool = False) -> Run | None:
    """Run the migration step on the local database (see playbooks/migrate.yml)."""
    notebook_parameters = check_step_inputs(notebook, script, phase, parameters)
    if plan and (notebook or script or parameters or fixtree or phase != "all" or not run_migrate):
        raise InvalidInput("--plan shows every pending migration and runs nothing: give no --notebook, --script, "
                           "--param, --fixtree, --phase or --no-migrate with it")
    if not (run_migrate or notebook or script or fixtree or plan):
        raise InvalidInput("--no-migrate leaves nothing to run: give it a --notebook, a --script or --fixtree")
    if not run_migrate and phase != "all":
        raise InvalidInput(f"--phase {phase} chooses the migrations to apply, and --no-migrate applies none: give one "
                           "of the two")
    inv = inventory.load()
    local = inv.local_env()
    if plan:
        run_playbook("migrate_plan.yml", limit=local)
        say("the plan is above, its pending migrations last; nothing was applied (inv migrate applies them)")
        return None
    run = run or Run("migrate", route=[local])
    snapshot_name = inv.hostvars[local].get("django_migrate_snapshot", "before_step")
    what = (f"notebook {Path(notebook).name}" if notebook else f"script {Path(script).name}" if script
            else f"migrate ({phase})" if run_migrate else "fixtree")
    extra = {"django_migrate_phase": phase, "django_migrate_migrate": run_migrate,
             "django_migrate_fixtree": fixtree, "django_migrate_output_dir": str(run.dir),
             "django_migrate_parameters": notebook_parameters,
             "django_migrate_unfinished_mark": str(unfinished.path()),
             "django_migrate_unfinished_record": unfinished.record(run.dir.name, what)}
    if notebook:
        extra["django_migrate_notebook"] = str(Path(notebook).resolve())
    if script:
        extra["django_migrate_script"] = str(Path(script).resolve())
    with _locks([] if locked else [LOCAL_LOCK], "migrate", say):
        unfinished.refuse_if_unfinished("migrate")  # under the lock: no step can be starting meanwhile
        with run.step("migrate", env=local, what=what, phase=phase,
                      interrupted=lambda: _migrate_interrupted(run, local, snapshot_name) + _pulled_before(run)):
            say(f"==> {what} on the local database (a safety snapshot is taken first)")
            try:
                run_playbook("migrate.yml", limit=local, extra_vars=extra, run=run)
            except Interrupted:
                raise
            except DrydockError as error:
                # A failing step puts the database back and removes its mark; one still there
                # means the step was stopped midway (ansible-playbook killed, say).
                raise _with_unfinished_advice(error) from None
    if notebook:
        say(f"executed notebook: {run.dir / Path(notebook).name}")
    say(f"{what}: done; the page tree is consistent")
    return run


def _with_unfinished_advice(error: DrydockError) -> DrydockError:
    """`error`, with what an unfinished step's mark on the local database means, if it has one."""
    mark = unfinished.read()
    if mark is None or unfinished.running(mark):
        return error
    return DrydockError(f"{error}; {unfinished.left_half_changed(mark)}")


# drydock_progress records a role's task as "<role> : <name>": the step's mark, written once
# its safety snapshot is taken (roles/django_migrate).
MIGRATE_MARK_TASK = "django_migrate : Mark the local database as in the middle of a step"


def _pulled_before(run: Run) -> str:
    """In a pipeline, what its pull did before the step: "unchanged" is about the step alone."""
    pulls = [step for step in read(run.dir) if step["step"] == "pull" and step.get("outcome") == "ok"]
    return ("; the pipeline's pull before it had replaced the local database (snapshot pre_pull holds the one from "
            "before the pipeline)") if pulls else ""


def _changed_before(run: Run, env: str) -> str:
    """In a pipeline, what its steps before this one changed on `env` (a push) or on the
    local database (the pull): "nothing changed" is about the interrupted step alone."""
    if any(step["step"] == "restore" and step.get("env") == env and step.get("outcome") == "ok" for step in read(run.dir)):
        return (f"; the pipeline's push before it had put its copy live on {env}, unchecked: inv verify {env}, and "
                f"inv rollback {env} if that fails")
    return _pulled_before(run)


def _migrate_interrupted(run: Run, local: str, snapshot_name: str) -> str:
    """What an interrupted migration step left, by its mark (drydock/unfinished.py): there from
    the safety snapshot until the database is whole again. Without it, the advice to restore
    the snapshot would be wrong: that snapshot may be an older step's, from before a pull."""
    mark = unfinished.read()
    if mark is not None:
        return (f"the local database may be half-changed: put it back with "
                f"`inv snapshot.restore {mark.get('snapshot') or snapshot_name}` (or pull again); migrate, push and "
                "snapshot.save refuse until then, and verify local fails")
    progress = run.progress()
    if progress is None and not _no_task_began(run):
        return ("the local database is whole: the step had not begun changing it, or had ended or put it back "
                "(`inv verify local` shows its migrations)")
    marked = any((entry.get("host"), entry.get("task"), entry.get("event")) == (local, MIGRATE_MARK_TASK, "ok")
                 for entry in progress or [])
    if marked:
        return ("the step had ended, or put the local database back, before the interruption: the database is whole "
                "(`inv verify local` shows its migrations)")
    return "the step had not begun changing the local database (its safety snapshot comes first): it is unchanged"


def confirm(env: str, protected: bool, yes: bool, action: str, ask: Callable[[str], str] = input) -> bool:
    """A protected environment needs its name typed (or --yes); returns whether confirmed."""
    if not protected or yes:
        return True
    if not sys.stdin.isatty():
        raise DrydockError(f"refusing to {action} {env} without confirmation: not interactive, pass --yes")
    try:
        answer = ask(f"{action} {env}: type its name to go on: ")
    except EOFError:  # Ctrl-D
        answer = ""
        print()
    except KeyboardInterrupt:  # every command asks before its run begins: there are no steps to look up
        print()
        raise Interrupted(f"interrupted at the confirmation: nothing was done to {env}") from None
    if answer.strip() != env:
        raise DrydockError(f"not confirmed: nothing was done to {env}")
    return True


def _server(env_text: str) -> tuple[inventory.Inventory, str, dict]:
    inv = inventory.load()
    env = inv.server(env_text)
    return inv, env, inv.hostvars[env]


def push(env_text: str, dump_path: str | None = None, yes: bool = False, allow_lost_writes: bool = False,
         allow_unscrubbed: bool = False, allow_older_schema: bool = False, say: Say = print, run: Run | None = None,
         locked: bool = False) -> Dump:
    refuse_empty(dump=dump_path)
    if allow_unscrubbed and not dump_path:
        raise InvalidInput("--allow-unscrubbed applies to a --dump only: without one, the push scrubs the copy itself")
    inv, env, target = _server(env_text)
    protected = inv.protected(env)
    take_safety_backup = _takes_safety_backup(env, target)
    confirm(env, protected, yes, "push to")
    own_run = run is None
    run = run or Run("push")
    with _locks([env] if not locked else [], "push", say):
        if dump_path:
            dump = dumps.load(Path(dump_path))
            if own_run:
                run.route = [dump.source_env, env]
        else:
            local = inv.local_env()
            if own_run:
                run.route = [local, env]
            # The local database's lock only while it is dumped: nothing after reads it.
            with _locks([LOCAL_LOCK] if not locked else [], "push", say):
                unfinished.refuse_if_unfinished(f"push the local database to {env}")
                with run.step("dump local", env=local, scrub=not protected,
                              interrupted=lambda: "nothing changed" + ("" if protected else
                                                                       "; the next push drops the outgoing copy left behind")
                              + _pulled_before(run)) as step:
                    say(f"==> dumping the local database for {env}" + ("" if protected else " (scrubbed copy)"))
                    dump = _run_dumping("prepare_push.yml", limit=local, run=run, extra_vars={
                        "drydock_scrub": not protected, "pg_backup_controller_dir": str(backups_dir())})
                    step.update(dump=str(dump.path), bytes=dump.manifest["dump"]["size"], rows=dump.total_rows,
                                scrubbed=dump.manifest.get("scrubbed", []))
            _keep_artifact(run, dump.path.parent / "manifest.json", f"manifest-{local}.json")
        def left(host_answers: bool) -> str:
            return (_push_interrupted(run, env, target["drydock_db_name"], dump, say, host_answers)
                    + _safety_backup_note(run, env, "the interruption" if host_answers else "the host stopped answering"))

        with run.step("restore", env=env, dump=str(dump.path), bytes=dump.manifest["dump"]["size"],
                      rows=dump.total_rows, interrupted=lambda: left(True), unreachable=lambda: left(False)) as step:
            say(f"==> restoring {dump.path.name} onto {env} (from {dump.path.parent})")
            safety = _run_dumping("restore_database.yml", limit=env, run=run, extra_vars={
                "drydock_dump": str(dump.path), "drydock_confirm": env if protected else "",
                "drydock_allow_lost_writes": allow_lost_writes, "drydock_allow_unscrubbed": allow_unscrubbed,
                "drydock_allow_older_schema": allow_older_schema,
                "drydock_safety_backup": take_safety_backup,
                "pg_backup_controller_dir": str(backups_dir())}, optional=True)
            step.update(safety_backup=str(safety.path) if safety else None)
            if take_safety_backup and safety is None:
                # The playbook stops before swapping when the backup fails: reaching here is a
                # bug, and the operator must know the push has no backup to go back to.
                raise DrydockError(f"{env} runs the pushed copy, but no safety backup of its previous database was "
                                   f"recorded; {target['drydock_db_name']}__previous still holds it")
    say(f"{env} now runs the pushed copy (a dump of {dump.manifest['dump']['size']:,} bytes, {dump.total_rows:,} rows, "
        f"all counts equal to the manifest; "
        f"Site {_site_address(target)}); "
        + (f"its previous database is kept as {target['drydock_db_name']}__previous (inv rollback {env})"
           if not _swapped_onto_nothing(run, env) else
           f"it had no live database to replace: {target['drydock_db_name']}__previous was left as it was")
        + (f"; safety backup: {safety.path}" if safety else ""))
    return dump


def _no_task_began(run: Run) -> bool:
    """With no progress recorded at all: whether Ansible had not begun a task yet (its log
    shows none either), rather than running without the progress callback."""
    return "TASK [" not in run.ansible_log.read_text(errors="replace")


# A push that passed its checks runs drydock_db_swap once more, to drop the generation its
# swap kept (restore_database.yml): no swap-back, nor part of the swap.
DROP_KEPT_GENERATION_TASK = "Drop the generation kept until the checks passed"


def _run_began(run: Run) -> str:
    """When the run began, as verify's `live since` writes a time (UTC): a database swapped in
    since is this run's, even one restored from the same dump as the one it replaced."""
    return began(run.dir).isoformat(timespec="seconds")


def _checks_passed(run: Run, env: str) -> bool:
    """Whether the push's checks after its swap passed: the task that follows only them began
    (skipped, when the swap kept no generation, counts: it was reached)."""
    return any(entry.get("host") == env and str(entry.get("task", "")).startswith(DROP_KEPT_GENERATION_TASK)
               for entry in run.progress() or [])


# What an interrupted pull or push left depends on whether its swap ran, which only the
# progress Ansible reported tells (drydock_progress): its log does not show a task stopped
# midway. The swap is one transaction, so the live database is always whole.
def _swap_state(run: Run, host: str) -> str:
    """Whether the run's swap on `host` ran: "not run", "ran", "running" (stopped while the
    swap task ran, or the host stopped answering), "swapping back" (a second swap had
    started) or "unknown" (tasks ran, but no progress was recorded)."""
    events = run.task_events(host, "drydock_db_swap", but=DROP_KEPT_GENERATION_TASK)
    if events is not None and events.count("start") > 1:
        return "swapping back"
    return _events_state(run, events)


def _events_state(run: Run, events: list[str] | None) -> str:
    """_task_state of a module's events (Run.task_events), or, when no progress was recorded,
    "not run" if no task had begun, else "unknown"."""
    if events is None:
        return "not run" if _no_task_began(run) else "unknown"
    return _task_state(events)


def _task_state(events: list[str]) -> str:
    """One task's state from its progress events: "not run" (never started, or failed: a
    module that fails rolls its transaction back), "ran", or "running" (no result: it may
    have gone through, or its host stopped answering)."""
    if not events:
        return "not run"
    return {"ok": "ran", "failed": "not run"}.get(events[-1], "running")


# drydock_db_swap's account of a swap that found no live database to set aside.
NOTHING_WAS_LIVE = "nothing was live to set aside"


def _swapped_onto_nothing(run: Run, host: str) -> bool:
    """Whether the run's swap on `host` found no live database (one dropped by hand): it then
    left <db>__previous, or snapshot pre_pull, as it was (module_utils' swap_in)."""
    return (run.task_account(host, "drydock_db_swap") or "").startswith(NOTHING_WAS_LIVE)


def _pulled_over(run: Run, local: str) -> tuple[bool, dict | None]:
    """After a pull's swap ran: whether it replaced a local database (then kept as snapshot
    pre_pull), and the mark of an unfinished step that went with that one into pre_pull."""
    if _swapped_onto_nothing(run, local):
        # pre_pull, and its mark, are as they were; a mark on the live database was about the
        # one dropped by hand: the pulled one is whole.
        unfinished.clear_unless_running()
        return False, None
    return True, unfinished.pulled()


def _pull_interrupted(run: Run, local: str, dump: Dump) -> str:
    state = _swap_state(run, local)
    if state == "not run":
        return ("the swap did not run: the local database is unchanged; the next pull drops any side database and "
                "archive left behind")
    if state == "ran":
        replaced, half_changed = _pulled_over(run, local)
        return ("the swap ran: the local database is the pulled one, and "
                + ("the one before it is snapshot pre_pull (`inv snapshot.restore pre_pull` brings it back; a second "
                   "pull would replace it)" if replaced else
                   "there was none before it to replace: snapshot pre_pull was left as it was")
                + (_kept_half_changed(half_changed) if half_changed else ""))
    unfinished.pulled(swap_certain=False)  # pre_pull may now hold what a step left half-changed
    return ("the swap may have run: the local database is the old one or the pulled one, never half of each; "
            f"`inv verify local` says which (the pulled one's live database line reads `restored from "
            f"{dump.source_env}'s backup {dump.manifest['created']}; live since` a time after {_run_began(run)}); if "
            f"the swap went through, snapshot pre_pull holds the old one, and a second pull would replace it")


def _push_interrupted(run: Run, env: str, database: str, dump: Dump, say: Say, host_answers: bool = True) -> str:
    """What an interrupted push left on `env`, and how to go on. With `host_answers` false (the
    push failed because the host stopped answering), nothing is tried on the host."""
    state = _swap_state(run, env)
    manifest = dump.path.parent / "manifest.json"
    if state == "not run":
        app = _restart_app(run, env, say) if host_answers else _app_left(run, env)
        return (f"the swap did not run: {env} runs its old database, {app}; the next push "
                f"drops any side database left behind")
    if state == "ran" and _swapped_onto_nothing(run, env):
        return (f"the swap ran: {env} runs the pushed copy (it had no live database to replace: {database}__previous "
                f"was left as it was), and its app may be stopped: `inv app.restart {env}` starts it")
    if state == "ran" and _app_may_be_stopped(run, env) is False:  # stopped during its checks, or after them
        checked = (", which passed its checks, and its app was not left stopped" if _checks_passed(run, env) else
                   ", unchecked (stopped before its checks ended), and its app was not left stopped:"
                   f" `inv verify {env}` checks it")
        return (f"the swap ran: {env} runs the pushed copy{checked}; its database from before is {database}__previous"
                f" (`inv rollback {env}` brings it back; a second push would drop it)")
    if state == "ran":
        return (f"the swap ran: {env} runs the pushed copy, its database from before is {database}__previous, and its "
                f"app may be stopped: `inv rollback {env}` brings that database back and starts the app (a second "
                f"push would drop it), or `inv app.restart {env}` starts the app on the pushed copy, unchecked: then "
                f"`inv verify {env}`")
    if state == "running":
        return (f"the swap was running: {env} runs its old database or the pushed copy, and its app may be stopped; "
                f"`inv verify {env}` says which (the copy's live database line reads `pushed from "
                f"{dump.source_env}'s dump {dump.manifest['created']}; live since` a time after {_run_began(run)}):"
                f" if it is the copy, `inv rollback {env}` brings back the database from before and starts the app,"
                f" or `inv app.restart {env}` starts the app on the copy (a second push would drop the database from"
                f" before); if not, push again")
    what = ("it was being swapped back after a failed check" if state == "swapping back" else
            "no task progress was recorded (is ANSIBLE_CALLBACKS_ENABLED set without drydock_progress?)")
    return (f"whether the swap ran cannot be told, {what}: {env} runs its old database or the pushed copy, and its "
            f"app may be stopped; `inv verify {env} --manifest {manifest}` passes on the pushed copy alone: see which "
            f"one it is before you roll back or push again (a second push would drop {database}__previous)")


def _safety_backup_note(run: Run, env: str, before: str = "the interruption") -> str:
    made = _fetched_into(run, backups_dir() / env / "safety")
    # Not one a push that did not go live deleted again before the interruption.
    return f"; its safety backup, taken before {before}: {made}" if made and made.exists() else ""


# drydock_progress records a role's task as "<role> : <name>": app_service's stop and start.
APP_STOP_TASKS = "app_service : Stop the app"
APP_START_TASKS = "app_service : Start the app"


def _app_may_be_stopped(run: Run, env: str) -> bool | None:
    """Whether this run may have left `env`'s app stopped: a stop of it began, and no start
    ended well after it. None when tasks ran but no task progress was recorded."""
    progress = run.progress()
    if progress is None:
        return False if _no_task_began(run) else None
    stopped = False
    for entry in (e for e in progress if e.get("host") == env):
        task = str(entry.get("task", ""))
        if task.startswith(APP_STOP_TASKS) and entry.get("event") == "start":
            stopped = True
        elif task.startswith(APP_START_TASKS) and entry.get("event") == "ok":
            stopped = False
    return stopped


def _app_left(run: Run, env: str) -> str:
    """What became of `env`'s app in a run whose host stopped answering: nothing is tried there."""
    if _app_may_be_stopped(run, env) is False:
        return "and its app was not left stopped"
    return f"and its app may be stopped: once the host answers, inv app.restart {env}"


def _restart_app(run: Run, env: str, say: Say) -> str:
    """Restart `env`'s app if the interrupted run may have left it stopped, so that the target
    is left serving, as it was. Called only where the database the app would serve is whole
    and meant to be live: a push's swap had not run; a rollback's exchange ran or not (its own
    `always` starts the app either way). Says what became of the app, for the one line."""
    advice = f"restart it: inv app.restart {env} (or its unit or start command)"
    stopped = _app_may_be_stopped(run, env)
    if stopped is None:
        return f"and its app may be stopped (no task progress was recorded): {advice}"
    if not stopped:
        return "and its app was not left stopped"
    say(f"==> restarting {env}'s app, stopped before the interruption (Ctrl-C again to leave it stopped)")
    try:
        run_playbook("restart_app.yml", limit=env, run=run, extra_vars={"drydock_confirm": env})
    except KeyboardInterrupt:
        return f"but its app may be stopped (its restart was interrupted): {advice}"
    except DrydockError as error:
        return f"but its app, stopped before the interruption, did not come back ({error}): {advice}"
    return "and its app, stopped before the interruption, was restarted and passed its health check"


def restart_app(env_text: str, yes: bool = False, say: Say = print) -> None:
    inv, env, _ = _server(env_text)
    confirm(env, inv.protected(env), yes, "restart the app of")
    run = Run("app-restart", route=[env])
    with target_lock(env, "app restart", say), run.step(
            "restart app", env=env, interrupted=f"its app may be stopped: inv app.restart {env} starts it"):
        run_playbook("restart_app.yml", limit=env, run=run, extra_vars={"drydock_confirm": env})
    say(f"{env}'s app was restarted and passed its health check")


def _takes_safety_backup(env: str, hostvars: dict) -> bool:
    """Protected targets, unless the inventory's drydock_safety_backup says otherwise (the
    playbook's own default is the same; this decision is passed to it)."""
    name = "drydock_safety_backup" if "drydock_safety_backup" in hostvars else "drydock_protected"
    return inventory.as_bool(hostvars.get(name, False), f"{name} of {env}")


def rollback(env_text: str, yes: bool = False, allow_lost_writes: bool = False, allow_failed_check: bool = False,
             say: Say = print) -> None:
    inv, env, target = _server(env_text)
    confirm(env, inv.protected(env), yes, "roll back")
    run = Run("rollback", route=[env])
    with target_lock(env, "rollback", say), run.step(
            "rollback", env=env, interrupted=lambda: _rollback_interrupted(run, env, target["drydock_db_name"], say)):
        try:
            run_playbook("rollback_database.yml", limit=env, run=run,
                         extra_vars={"drydock_confirm": env, "drydock_allow_lost_writes": allow_lost_writes,
                                     "drydock_allow_failed_check": allow_failed_check})
        except DrydockError as error:
            # The playbook's own refusals and its exchange's failures say what they left; a
            # failure before either (a server that does not answer) says nothing of it.
            if not isinstance(error, Interrupted) and "the app was left running" not in str(error) \
                    and _stop_never_began(run, env):
                error.args = (f"{error} (nothing was rolled back: {env} runs the database it ran before, and its app"
                              " was not stopped)",)
            raise
    say(_exchanged(run, env, target["drydock_db_name"]))


def _stop_never_began(run: Run, env: str) -> bool:
    """Whether this run never began to stop `env`'s app, by the tasks' progress."""
    progress = run.progress()
    if progress is None:
        return _no_task_began(run)
    return not any(entry.get("host") == env and entry.get("event") == "start"
                   and str(entry.get("task", "")).startswith(APP_STOP_TASKS) for entry in progress)


def _exchanged(run: Run, env: str, database: str) -> str:
    """What a rollback's exchange left, said the same way whichever way it went (a second
    rollback swaps forward): which database is live now, and where it came from."""
    now_live = run.task_account(env, "drydock_db_swap")
    return (f"{env} now runs the database it had kept as {database}__previous" + (f": {now_live}" if now_live else "")
            + f"; the one it replaced is kept as {database}__previous in its place (inv rollback {env} swaps them back)")


def _rollback_interrupted(run: Run, env: str, database: str, say: Say) -> str:
    state = _swap_state(run, env)
    if state == "swapping back":
        # Its health check had failed: the app must not be started on the database that failed it.
        return (f"it was swapping back after the app failed its check: {env} runs one of its two databases, whole "
                f"(inv verify {env} says which), and its app may be stopped: once the database you want is live "
                f"(inv rollback {env} exchanges them), inv app.restart {env}")
    if state == "not run":
        where = f"the exchange did not run: {env} runs the database it ran before"
    elif state == "ran":
        where = f"the exchange ran: {_exchanged(run, env, database)}"
    else:
        where = (f"the exchange may have run: {env} runs one of its two databases, whole, and {database}__previous the "
                 f"other (inv verify {env} says which)")
    # The rollback's own `always` starts the app whatever became of the exchange: so here too.
    return f"{where}, {_restart_app(run, env, say)}"


def _pipeline_rollback_interrupted(run: Run, target: str, database: str, say: Say) -> str:
    """An interrupted rollback's account, and, when its exchange did not run, which database
    that leaves live: the pushed copy, which failed verification."""
    left = _rollback_interrupted(run, target, database, say)
    if _swap_state(run, target) == "not run":
        left += (f"; that is the pipeline's pushed copy, which failed verification: inv rollback {target} brings back "
                 f"the database from before the push")
    return left


def pipeline(source_text: str, target_text: str, notebook: str | None = None, script: str | None = None,
             parameters: list[str] | tuple[str, ...] = (), yes: bool = False, allow_lost_writes: bool = False,
             allow_older_schema: bool = False, say: Say = print) -> Run:
    """backup → pull → migrate (+ notebook or script) → push, one target lock around it all."""
    check_step_inputs(notebook, script, parameters=parameters)
    inv = inventory.load()
    # First: a sandbox that is down has no app URL to check below, and says so here.
    source, target = inv.server(source_text), inv.server(target_text)
    # The migration step would refuse it, after the backup and the pull: refused before them.
    local_vars = inv.hostvars[inv.local[0]]
    app_database_url(str(local_vars.get("drydock_app_database_url", "")),
                     str(local_vars.get("drydock_app_database_url_env", "DATABASE_URL")))
    if inv.protected(target) and not inv.protected(source):  # the push would refuse it, after all the rest
        raise DrydockError(f"refusing to push to {target} a copy of {source}'s data: {source} is not protected, so its "
                           f"data may be scrubbed or made up; run the pipeline from {target}")
    confirm(target, inv.protected(target), yes, "push to")
    run = Run("pipeline", total=7, say=say, route=list(dict.fromkeys([source, inv.local_env(), target])))
    with _locks(list(dict.fromkeys([source, target, LOCAL_LOCK])), "pipeline", say):
        dump = backup(source, say=say, run=run, locked=True)
        pulled = pull(source, dump_path=str(dump.path), say=say, run=run, locked=True)
        migrate(notebook=notebook, script=script, parameters=parameters, say=say, run=run, locked=True)
        verify(inv.local_env(), say=say, run=run, locked=True)
        pushed = push(target, yes=True, allow_lost_writes=allow_lost_writes, allow_older_schema=allow_older_schema,
                      say=say, run=run, locked=True)
        try:
            verify(target, manifest=str(pushed.path.parent / "manifest.json"), say=say, run=run, locked=True)
        except Interrupted:
            raise  # stopped by hand, not a failed check: nothing is rolled back
        except HostUnreachable as error:  # no check failed, and a rollback could not reach the host either
            raise DrydockError(f"{error} (not rolled back: {target} runs the pushed copy, unchecked; once it answers, "
                               f"inv verify {target}, and inv rollback {target} if that fails)") from None
        except DrydockError as error:
            say(f"==> {target} failed verification: rolling the push back")
            run.total += 1  # a step the plan had not counted
            database = inv.hostvars[target]["drydock_db_name"]
            try:
                with run.step(f"rollback {target}", env=target,
                              interrupted=lambda: _pipeline_rollback_interrupted(run, target, database, say)) as step:
                    # The copy set aside is marked as failed: inv rollback then refuses to put it live again.
                    run_playbook("rollback_database.yml", limit=target, run=run, extra_vars={
                        "drydock_confirm": target,
                        "drydock_rollback_failed_check": f"inv verify {target} failed after the push: {error}"})
                    step.update(state=f"{target} back on its previous database")
            except Interrupted:
                raise
            except DrydockError as refused:  # e.g. the target took writes since the push: they stay live
                # The playbook's "pass --allow-lost-writes" means the rollback's option, not the pipeline's.
                knowingly = (f"; to roll back anyway: inv rollback {target} --allow-lost-writes"
                             if "--allow-lost-writes" in str(refused) else "")
                # The host's name: the refusal names it again; "not rolled back" says the rest, unless
                # its app did not start again.
                reason = str(refused).removeprefix(f"{target}: ").removesuffix(
                    f" (nothing was rolled back: {target} runs the database it ran before, and its app was started again)")
                raise DrydockError(f"{error} (not rolled back: {reason}){knowingly}") from None
            raise DrydockError(f"{error} (the push was rolled back: {target} runs its previous database; inv rollback "
                               f"refuses to put the pushed copy live again unless --allow-failed-check)") from None
    say(f"\npipeline {source} → {target} done ({pulled.total_rows:,} rows pulled)\n{run.summary()}")
    return run


@contextmanager
def _locks(envs: list[str], task: str, say: Say) -> Iterator[None]:
    """Hold the locks of `envs` (none: the caller holds them already)."""
    with ExitStack() as stack:
        for env in envs:
            stack.enter_context(target_lock(env, task, say))
        yield


def show_page(env_text: str, path: str, say: Say = print) -> str:
    """Fetch a page from ENV's app over HTTP and say what it shows (the demo's last step)."""
    import re
    import urllib.request

    _inv, env, target = _server(env_text)
    url = target.get("drydock_app_url", "").rstrip("/") + path
    if not url.startswith("http"):
        raise DrydockError(f"{env} has no drydock_app_url to fetch {path} from")
    with urllib.request.urlopen(url, timeout=10) as response:
        html = response.read().decode()
    title = re.search(r"<h1>(.*?)</h1>", html, re.S)
    kind = re.search(r'<p class="kind">(.*?)</p>', html, re.S)  # the example site's Blog or Podcast
    posts = html.count("<li>")
    say(f"{url} → {response.status}: {title.group(1).strip() if title else '?'}"
        + (f", a {kind.group(1).strip()}" if kind else "") + f" ({posts} posts listed)")
    return html


def verify(env_text: str, manifest: str | None = None, say: Say = print, run: Run | None = None,
           locked: bool = False) -> Path:
    """Verify one environment's database against the code; the report is kept in the run.
    It takes the environment's lock: a database halfway through a migration step or a push
    would fail for the wrong reasons."""
    inv = inventory.load()
    env = inv.environment(env_text)
    refuse_empty(manifest=manifest)
    if manifest and Path(manifest).is_dir():
        manifest = str(Path(manifest) / "manifest.json")
    if manifest and not Path(manifest).is_file():
        raise InvalidInput(f"no such manifest: {manifest}")
    if manifest and not _has_row_counts(Path(manifest)):
        raise InvalidInput(f"{manifest} is not a drydock manifest (or an incomplete one): it has no row counts to compare")
    run = run or Run("verify", route=[env])
    report = run.dir / f"verify-{env}.txt"
    lock = inv.lock_name(env)
    try:
        with _locks([] if locked else [lock], "verify", say), run.step(
                f"verify {env}", env=env, report=str(report),
                interrupted=lambda: f"verify only reads {env}: nothing changed (a scratch database it was building on"
                                    f" the local cluster is dropped by the next verify of {env})"
                                    + _changed_before(run, env)):
            try:
                run_playbook("verify_database.yml", limit=env, run=run, extra_vars={
                    "drydock_verify_report": str(report),
                    "drydock_manifest": str(Path(manifest).resolve()) if manifest else ""})
            except Interrupted:
                raise
            except DrydockError as error:  # a failed check says so, and the mark's advice too
                raise _with_unfinished_advice(error) if lock == LOCAL_LOCK else error from None
            # Schema, migrations and page tree can all pass on a database a step left
            # half-changed: the mark is about its data, which no check here sees. The report
            # is still shown (which database is live, after an interrupted pull or restore).
            mark = unfinished.read() if lock == LOCAL_LOCK else None
            if mark is not None:
                raise DrydockError(f"{env} passed its checks, but {unfinished.left_half_changed(mark)}")
    finally:
        if report.exists():
            say(report.read_text().rstrip())
    return report


def runs_list(last: int | str = 20, say: Say = print) -> list[dict]:
    """The newest `last` runs (0: all), oldest first, so the newest ends the listing where the eye lands."""
    from drydock import journal

    last = valid_count(last, "--last", minimum=0)
    runs = journal.list_runs()
    shown = runs[-last:] if last else runs
    if len(shown) < len(runs):
        hidden = len(runs) - len(shown)
        say(f"{hidden} older run{'s' if hidden > 1 else ''} not shown (--last 0 lists them all)")
    say(journal.table(shown, ["id", "task", "envs", "start", "outcome", "seconds", "failed_step"]) if runs else "no runs yet")
    return shown


# The steps that swap a database in: a pull's, a push's restore (a pipeline's too) and a
# rollback's; a run killed in one may have ended on either side of its swap. Not a
# pipeline's "rollback <env>", which follows its push's swap on the same host.
SWAPPING_STEPS = ("pull", "restore", "rollback")


def _killed_swap_account(run: Run, env: str, step: str) -> str:
    """For a run killed in `step`, what it left on `env`, told from the progress Ansible
    reported (a killed run wrote no line of its own): whether its swap ran, whether a pushed
    copy passed its checks, and whether the app may be stopped."""
    state = _swap_state(run, env)
    if state == "not run":
        account = f"the swap did not run: {env} runs the database it ran before this run"
    elif state == "ran":
        account = "the swap ran" + ("" if step != "restore" else ", and the copy passed its checks"
                                    if _checks_passed(run, env) else
                                    f", but the copy's checks did not end: `inv verify {env}` checks it")
    elif state in ("running", "swapping back"):
        what = "the swap" if state == "running" else "a swap back after a failed check"
        account = f"{what} was running when the run ended: `inv verify {env}` says which database is live"
    else:
        account = f"whether the swap ran cannot be told (no task progress was recorded): `inv verify {env}`"
    app = f"; its app may be stopped: `inv app.restart {env}`" if _app_may_be_stopped(run, env) else ""
    return f"{env}: {account}{app}"


def runs_show(run_id: str, say: Say = print) -> list[dict]:
    from drydock import journal
    from drydock.paths import runs_dir

    if "/" in run_id:  # the run's folder, as a shell completes it (runs/<id>/)
        folder = Path(run_id.rstrip("/")).absolute()
        if folder.parent.resolve() != runs_dir().resolve():
            raise InvalidInput(f"{run_id!r} is not a run's folder under {runs_dir()}: give its id (inv runs.list)")
        run_id = folder.name
    if not run_id.strip() or run_id.startswith("."):
        raise InvalidInput(f"invalid run id {run_id!r}")
    folder = runs_dir() / run_id
    if folder not in journal.run_folders():  # runs/locks and runs/cache are not runs
        raise DrydockError(f"no run {run_id} under {runs_dir()}: see inv runs.list")
    steps = journal.read(folder)
    rows = [{"step": s["step"], "start": s["start"][11:19], "outcome": s.get("outcome", "?"),
             "seconds": f"{s['seconds']:.1f}" if "seconds" in s else "", "bytes": f"{s['bytes']:,}" if "bytes" in s else "",
             "rows": f"{s['rows']:,}" if "rows" in s else ""} for s in steps]
    say(journal.table(rows, ["step", "start", "outcome", "seconds", "bytes", "rows"]))
    for s in steps:
        if s.get("outcome") in journal.FAILED:
            say(f"{s['outcome']} at {s['step']}: {s.get('error', '')}")
        if s.get("outcome") == "killed" and s.get("env") and s["step"] in SWAPPING_STEPS:
            say(_killed_swap_account(journal.Run.of(folder), s["env"], s["step"]))
        if s.get("outcome") == "killed" and s["step"].startswith("snapshot ") and s.get("snapshot"):
            say(_killed_snapshot_account(journal.Run.of(folder), s["step"].split()[1], s["snapshot"]))
    say("files: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    return steps
