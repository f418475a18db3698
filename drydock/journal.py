"""The run journal: runs/<timestamp>-<task>/ with journal.jsonl (one line per step),
the Ansible log and the run's artifacts. Folders 0700, files 0600: logs can name hosts
and databases of production."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from drydock.paths import runs_dir


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


class Run:
    def __init__(self, task: str, root: Path | None = None):
        base = root or runs_dir()
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = base / f"{_stamp()}-{task}"
        self.dir.mkdir(mode=0o700)
        self.task = task
        self.steps: list[dict] = []

    @property
    def ansible_log(self) -> Path:
        return self.dir / "ansible.log"

    def write(self, entry: dict) -> None:
        fd = os.open(self.dir / "journal.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    @contextmanager
    def step(self, name: str, **details) -> Iterator[dict]:
        """Journal a step: its start, end, outcome and whatever details the body adds."""
        entry = {"step": name, "start": datetime.now(timezone.utc).isoformat(), **details}
        started = time.monotonic()
        try:
            yield entry
            entry["outcome"] = "ok"
        except BaseException as error:
            entry["outcome"] = "failed"
            entry["error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise
        finally:
            entry["end"] = datetime.now(timezone.utc).isoformat()
            entry["seconds"] = round(time.monotonic() - started, 3)
            self.steps.append(entry)
            self.write(entry)

    def summary(self) -> str:
        width = max((len(s["step"]) for s in self.steps), default=4)
        lines = [f"{'step'.ljust(width)}  outcome  seconds"]
        lines += [f"{s['step'].ljust(width)}  {s['outcome']:<7}  {s['seconds']:>7.1f}" for s in self.steps]
        return "\n".join(lines)
