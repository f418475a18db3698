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
from typing import Callable, Iterator

from drydock.errors import HostUnreachable, Interrupted
from drydock.lock import owner_running, process_start
from drydock.paths import runs_dir


# Each task's start and result per host, written by callback_plugins/drydock_progress.
PROGRESS_FILE = "tasks.jsonl"


def json_lines(lines: list[str]) -> list[dict]:
    """The entries of a file of JSON lines (the journal, the progress and failure records),
    without blank lines and a line cut short (by a kill, or a disk that filled up)."""
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def read_progress(run_dir: Path, from_line: int = 0) -> list[dict] | None:
    """The task events drydock_progress recorded in a run's folder so far (from its line
    `from_line` on), in order, each {host, action, task, event}; a task skipped by its
    condition is left out (Ansible reports its start, then the skip). None when nothing was
    recorded at all (the callback was not enabled): then nothing can be told from it."""
    try:
        lines = (run_dir / PROGRESS_FILE).read_text().splitlines()[from_line:]
    except FileNotFoundError:
        return None
    entries: list[dict] = []
    for entry in json_lines(lines):
        if entry.get("event") == "skipped":
            started = [i for i, e in enumerate(entries) if e.get("event") == "start"
                       and (e.get("host"), e.get("task")) == (entry.get("host"), entry.get("task"))]
            if started:
                del entries[started[-1]]
                continue
        entries.append(entry)
    return entries


# A run's folder is named <UTC start, in this form>-<task>.
STAMP = "%Y%m%dT%H%M%S.%fZ"


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime(STAMP)


def began(folder: Path) -> datetime:
    """When the run in `folder` began, from the folder's name: not its mtime, which changes
    whenever a file comes or goes, up to the run's end."""
    return datetime.strptime(folder.name.split("-", 1)[0], STAMP).replace(tzinfo=timezone.utc)


class Run:
    def __init__(self, task: str, root: Path | None = None, total: int | None = None, say=None,
                 route: list[str] | None = None):
        # Made with the first step or log: a command refused before any step leaves no folder.
        self.dir = (root or runs_dir()) / f"{_stamp()}-{task}"
        self.task = task
        # The environments the run is to touch, in order (e.g. production, local, staging):
        # runs.list names them even for a run that ended before reaching them all.
        self.route = route
        self.steps: list[dict] = []
        # The dumps this run fetched whole, even if it was interrupted after (a backup's
        # retention, a push's restore): its one line names them.
        self.fetched: list[Path] = []
        # Progress: "[3/7] migrate (elapsed 41 s)" before each step, when the total is known.
        self.total = total
        self.say = say
        self.started = time.monotonic()
        # Where the current step's task events begin in the run's progress file: a pipeline's
        # rollback must not read its push's swap, on the same host, as its own.
        self._step_progress_from = 0

    @classmethod
    def of(cls, folder: Path) -> "Run":
        """A run that has ended, by its folder: to read what it recorded."""
        run = cls(folder.name.split("-", 1)[1], root=folder.parent)
        run.dir = folder
        return run

    def folder(self) -> Path:
        """The run's folder (0700), made on first use."""
        parent = self.dir.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # runs/ itself too, however it was made; only ours to change (DRYDOCK_RUNS may name a
        # folder another user made private for us).
        mode = parent.stat()
        if mode.st_uid == os.getuid() and mode.st_mode & 0o077:
            parent.chmod(0o700)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        return self.dir

    @property
    def ansible_log(self) -> Path:
        """The run's Ansible log, made 0600 here first: Ansible appends to an existing file,
        but would create it by the umask, and the log can show production data."""
        path = self.folder() / "ansible.log"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        return path

    @property
    def progress_file(self) -> Path:
        """Where callback_plugins/drydock_progress records each task's start and result."""
        return self.folder() / PROGRESS_FILE

    def progress(self) -> list[dict] | None:
        """The task events of the current step (the last one, once it ended) so far: see
        read_progress. None when the run recorded none at all."""
        return read_progress(self.dir, self._step_progress_from)

    def task_events(self, host: str, action: str, but: str = "") -> list[str] | None:
        """The events (start, ok, failed, unreachable) of the tasks running module `action` on
        `host` in the current step so far, in order (see read_progress), but those of tasks whose
        name begins with `but`, if given; None when the run recorded nothing at all."""
        progress = self.progress()
        if progress is None:
            return None
        return [entry["event"] for entry in progress if entry.get("host") == host and entry.get("action") == action
                and not (but and str(entry.get("task", "")).startswith(but))]

    def task_account(self, host: str, action: str) -> str | None:
        """The line the last task running module `action` on `host` returned for drydock's
        summary (its drydock_account), if one did."""
        accounts = [entry["account"] for entry in self.progress() or []
                    if (entry.get("host"), entry.get("action"), entry.get("event")) == (host, action, "ok")
                    and "account" in entry]
        return accounts[-1] if accounts else None

    def write(self, entry: dict) -> None:
        fd = os.open(self.folder() / "journal.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    @contextmanager
    def step(self, name: str, interrupted: str | Callable[[], str] = "",
             unreachable: Callable[[], str] | None = None, **details) -> Iterator[dict]:
        """Journal a step: its start, end, outcome and whatever details the body adds.
        Interrupted (Ctrl-C), it ends the command with one line that says what it may have
        left (`interrupted`, or what it returns then) and how to go on; failed because a host
        stopped answering, whose playbook's rescue then did not run to say so, it adds what
        `unreachable` returns to the failure's line."""
        self.folder()
        route = {"route": self.route} if self.route else {}
        entry = {"step": name, "start": datetime.now(timezone.utc).isoformat(), **route, **details}
        # A line at the start too: a run killed (SIGKILL, a crash) never writes its end, and
        # its journal must not read as if the step had not begun (nor lose which host it was on).
        on = {key: details[key] for key in ("env", "snapshot") if key in details}
        self.write({"step": name, "start": entry["start"], "outcome": "running", "pid": os.getpid(),
                    "process_start": process_start(os.getpid()), **route, **on})
        started = time.monotonic()
        try:
            self._step_progress_from = len(self.progress_file.read_text().splitlines())
        except FileNotFoundError:
            self._step_progress_from = 0
        if self.total and self.say:
            self.say(f"[{len(self.steps) + 1}/{self.total}] {name} (elapsed {started - self.started:.0f} s)")
        try:
            yield entry
            entry["outcome"] = "ok"
        except KeyboardInterrupt:
            entry["outcome"] = "interrupted"
            left = _account(interrupted)
            entry["error"] = f"interrupted during {name}" + (f": {left}" if left else "")
            raise Interrupted(entry["error"]) from None
        except HostUnreachable as error:
            entry["outcome"] = "failed"
            left = _account(unreachable) if unreachable else ""
            entry["error"] = f"{error}; {left}" if left else str(error)
            raise HostUnreachable(entry["error"]) from None
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


def read(run_dir: Path) -> list[dict]:
    """The run's steps, each as its last line says: a step that started and never ended is
    "running" while its process runs, else "killed"."""
    path = run_dir / "journal.jsonl"
    if not path.exists():
        return []
    steps: list[dict] = []
    unended: dict[tuple, int] = {}
    for entry in json_lines(path.read_text().splitlines()):
        key = (entry["step"], entry["start"])
        if entry.get("outcome") == "running":
            unended[key] = len(steps)
            steps.append(entry)
        elif key in unended:
            steps[unended.pop(key)] = entry
        else:
            steps.append(entry)
    for index in unended.values():
        if not owner_running(steps[index]):
            steps[index] = {**steps[index], "outcome": "killed",
                            "error": f"the run ended during {steps[index]['step']} without finishing it (killed?)"}
    return steps


def _account(left: str | Callable[[], str]) -> str:
    """What a stopped step left, as its callable tells, or why that could not be told: the
    one line must come whatever happens (a Ctrl-C while it is worked out too)."""
    try:
        return left() if callable(left) else left
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001
        return f"what it left could not be told ({str(error) or 'interrupted again'})"


def run_folders(root: Path | None = None) -> list[Path]:
    """The run folders, oldest first: named <start time>-<task> (runs/locks/ is not one)."""
    return sorted(p for p in (root or runs_dir()).glob("*-*") if p.is_dir() and p.name[:1].isdigit())


# A step's outcomes that end its run: the first such step is the run's outcome.
FAILED = ("failed", "interrupted", "killed")


def list_runs(root: Path | None = None) -> list[dict]:
    """Every run, oldest first: id, task, the environments it touched in order (e.g.
    production→local→staging), start, outcome, seconds, the step it failed at."""
    runs = []
    for folder in run_folders(root):
        steps = read(folder)
        failed = next((s for s in steps if s.get("outcome") in FAILED), None)
        running = any(s.get("outcome") == "running" for s in steps)
        # The route the run recorded; else (an older run) its steps' environments.
        route = next((s["route"] for s in steps if s.get("route")), None)
        envs = route or list(dict.fromkeys(s["env"] for s in steps if s.get("env")))
        runs.append({"id": folder.name, "task": folder.name.split("-", 1)[1], "envs": "→".join(envs) or "-",
                     "start": steps[0]["start"][:19] if steps else "-",
                     "outcome": failed["outcome"] if failed else ("running" if running else ("ok" if steps else "-")),
                     # Unknown while a step runs, or after one was killed: no end was written.
                     "seconds": round(sum(s["seconds"] for s in steps), 1)
                     if steps and all("seconds" in s for s in steps) else "",
                     "failed_step": failed["step"] if failed else "", "error": failed.get("error", "") if failed else ""})
    return runs


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)
