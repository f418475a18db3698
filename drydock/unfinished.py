"""The mark a migration step leaves while it runs on the local database.

A failing step puts the database back from its safety snapshot; an interrupted one (Ctrl-C,
a killed controller) cannot, and leaves it half-changed. Retaking the snapshot from there
would make that state the one a retry starts from, and a push would ship it. So `migrate`
marks the local database before its step and clears the mark once the database is whole
again: migrated, put back by the step itself, replaced by a pull or by a snapshot restore.
While the mark is there, migrate and a push of the local database refuse, saying how to
recover. The mark covers `inv` runs on this machine, like the locks beside it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from drydock.errors import DrydockError
from drydock.paths import runs_dir


def _path(root: Path | None = None) -> Path:
    return (root or runs_dir()) / "locks" / "local.unfinished-step.json"


def mark(run_id: str, what: str, snapshot: str, root: Path | None = None) -> None:
    path = _path(root)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"run": run_id, "step": what, "snapshot": snapshot,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)


def clear(root: Path | None = None) -> None:
    _path(root).unlink(missing_ok=True)


def read(root: Path | None = None) -> dict | None:
    """The mark's record, or None when no step is unfinished."""
    path = _path(root)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = {}
    return record if isinstance(record, dict) else {}


def refusal(action: str, record: dict) -> DrydockError:
    return DrydockError(
        f"refusing to {action}: the migration step {record.get('step', '?')} of run {record.get('run', '?')} "
        f"did not finish and may have left the local database half-changed; put it back with "
        f"`inv snapshot.restore {record.get('snapshot', 'before_step')}` (or pull again), then retry")


def started_before(record: dict, snapshot_created: str | None) -> bool:
    """Whether the step was stopped before its safety snapshot was taken (then it had not
    changed the database either): the snapshot is missing or older than the mark."""
    return not snapshot_created or snapshot_created < record.get("started", "")
