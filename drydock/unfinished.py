"""The mark a migration step leaves while it changes the local database.

A failing step puts the database back from its safety snapshot; an interrupted one (Ctrl-C,
a killed controller) cannot, and leaves it half-changed. Retaking the snapshot from there
would make that state the one a retry starts from, and a push would ship it. So the step
(roles/django_migrate) writes this mark once its safety snapshot is taken, and removes it
once the database is whole again: migrated, or put back from the snapshot. A snapshot
restore, which replaces the database, removes it too. A pull keeps the database it replaces
as snapshot pre_pull, so the mark goes with it (PRE_PULL): restoring pre_pull brings it back
rather than a half-changed database that looks whole. While it is there, migrate, a push of
the local database and a snapshot save refuse (and the step's own snapshot cannot be
deleted), and a verify of it fails once it has shown its checks, saying how to recover. It
covers `inv` runs on this machine, like the locks beside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from drydock.errors import DrydockError
from drydock.lock import owner_running, process_start
from drydock.paths import runs_dir


# The snapshot a pull keeps the database it replaced under (drydock_pg_restore's swap).
PRE_PULL = "pre_pull"


def path(root: Path | None = None, snapshot: str | None = None) -> Path:
    """The mark of the live local database, or of the snapshot that now holds a database a
    step left half-changed."""
    return (root or runs_dir()) / "locks" / ("local.unfinished-step.json" if snapshot is None
                                              else f"local.unfinished-step.{snapshot}.json")


def record(run_id: str, what: str) -> dict:
    """What the step writes into the mark (the playbook adds the snapshot's name)."""
    return {"run": run_id, "step": what, "pid": os.getpid(), "process_start": process_start(os.getpid())}


def read(root: Path | None = None, snapshot: str | None = None) -> dict | None:
    """The mark's record, or None when no step is unfinished."""
    mark = path(root, snapshot)
    if not mark.exists():
        return None
    try:
        value = json.loads(mark.read_text())
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def running(mark: dict) -> bool:
    """The step's drydock process is still at work: another command than this one, and not a
    later process given the same pid (its start differs)."""
    pid = int(mark.get("pid") or 0)
    if pid == os.getpid() or not owner_running(mark):
        return False
    if "process_start" in mark:
        return True
    try:  # a mark from before drydock recorded starts: a reused pid is some other program's, not Invoke's
        return b"invoke" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # alive, and not ours to judge


def clear_unless_running(root: Path | None = None) -> None:
    """The local database was replaced as a whole: forget an unfinished step, unless one is
    running right now (its mark is its own to remove)."""
    mark = read(root)
    if mark is not None and not running(mark):
        path(root).unlink(missing_ok=True)


def pulled(root: Path | None = None, swap_certain: bool = True) -> dict | None:
    """A pull swapped in a whole database and kept the one it replaced as snapshot pre_pull:
    an unfinished step's mark goes with that one (returned), and a mark pre_pull held from an
    earlier pull goes with what that pull dropped. A running step's mark stays its own. When
    the swap may or may not have run (`swap_certain` false), pre_pull gets a copy and the
    live database keeps its mark: a false alarm on one of them, never a half-changed
    database that looks whole."""
    mark = read(root)
    if mark is not None and running(mark):
        return None
    if mark is None:
        if swap_certain:
            path(root, PRE_PULL).unlink(missing_ok=True)
        return None
    # Its snapshot (before_step) is the way back only until the next step retakes it.
    _write(path(root, PRE_PULL), dict(mark, kept_by_pull=True))
    if swap_certain:
        path(root).unlink()
    return mark


def _write(target: Path, mark: dict) -> None:
    """Write a mark whole (a new file renamed over the old), 0600 like the rest of runs/."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".new")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(mark, handle)
    tmp.replace(target)


def restored(snapshot: str, root: Path | None = None) -> dict | None:
    """The local database is snapshot `snapshot` again: whole, unless that snapshot holds a
    database a step left half-changed, whose mark is then the live database's again (returned)."""
    mark = read(root, snapshot)
    if mark is None:
        clear_unless_running(root)
        return None
    _write(path(root), mark)  # a copy: the snapshot still holds that database, and keeps its own mark
    return mark


def snapshot_deleted(snapshot: str, root: Path | None = None) -> None:
    path(root, snapshot).unlink(missing_ok=True)


def refuse_if_unfinished(action: str, root: Path | None = None) -> None:
    """Refuse while a migration step that did not finish may have left the local database
    half-changed (or while one is running)."""
    mark = read(root)
    if mark is not None:
        raise refusal(action, mark)


def refusal(action: str, mark: dict) -> DrydockError:
    if running(mark):
        return DrydockError(f"refusing to {action}: the migration step of run {mark.get('run', '?')} is changing the "
                            "local database")
    return DrydockError(f"refusing to {action}: {left_half_changed(mark)}, then retry")


def left_half_changed(mark: dict) -> str:
    """What an unfinished step's mark means, and the way back."""
    snapshot = mark.get("snapshot") or "before_step"
    way_back = (f"pull again, or `inv snapshot.restore {snapshot}` if no migration step has run since that one (each "
                f"takes {snapshot} anew)" if mark.get("kept_by_pull") else
                f"put it back with `inv snapshot.restore {snapshot}` (or pull again)")
    return (f"the migration step {mark.get('step', '?')} of run {mark.get('run', '?')} did not finish and may have "
            f"left the local database half-changed; {way_back}")
