"""One run at a time per target: runs/locks/<env>.lock, holding the owner's PID and that
process's start, read, written and removed under one guard (runs/locks/.guard). A lock whose
process is gone (killed, crashed) is recognised and cleared, also when the system has since
given its PID to another process; the playbooks a run starts stop with it (drydock.playbook).
A step already running on a remote host when the controller died can still finish there
(the next run's restore drops a side database such a step may still be writing).
The local database has a lock too, "local" whatever the inventory calls its host: pull,
migrate, a push's dump, a pipeline, `site` and `verify` on the local host, and snapshot
save, restore and delete, which read no inventory, all take it (so no server may be called
"local")."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from drydock.errors import DrydockError
from drydock.paths import runs_dir


LOCAL = "local"  # the local database's lock
GUARD_TIMEOUT_S = 30


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the process's name (which may hold spaces), from
    its state on; None once the process has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """What tells this process from a later one given the same PID: the boot, and the start
    time in clock ticks since boot (/proc/<pid>/stat's 22nd field). None where it can't be read."""
    fields = stat_fields(pid)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}/{fields[19]}" if fields else None


def owner_running(record: dict) -> bool:
    """The process that wrote `record` (its "pid" and "process_start") still runs. A record
    without a start, as drydock wrote them before, is judged by its PID alone (but see
    drydock.unfinished.running)."""
    pid = int(record.get("pid") or 0)
    if pid <= 0 or not process_alive(pid):
        return False
    now = process_start(pid)
    if now is None:  # it ended just now, or its start can't be read: its PID decides
        return process_alive(pid)
    return record.get("process_start") in (None, now)  # None: an old record, judged by its PID


@contextmanager
def _guarded(folder: Path) -> Iterator[None]:
    """Only one run at a time reads, clears, writes or removes a lock in `folder`. Without it,
    two runs finding the same stale lock could each clear it, and the second clear the lock
    the first had just taken. The guard file is never removed, so all take the same lock; the
    system releases it when its holder ends, however it ends."""
    fd = os.open(folder / ".guard", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Held for milliseconds: a holder that keeps it (stopped, hung) gets an error, not a hang.
        deadline = time.monotonic() + GUARD_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DrydockError(f"{folder / '.guard'} has been held by another process for "
                                       f"{GUARD_TIMEOUT_S} s (a stopped drydock?): find it with fuser") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> dict | None:
    """The lock's record; None when there is no lock; {} when its file holds no record (a run
    died while writing it). A file that cannot be read is an error, never taken as torn."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DrydockError(f"cannot read the lock {path}: {error.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@contextmanager
def target_lock(env: str, task: str, say: Callable[[str], None] = print, root: Path | None = None) -> Iterator[Path]:
    runs = root or runs_dir()
    runs.mkdir(mode=0o700, parents=True, exist_ok=True)  # private as the run folders in it, from the start
    folder = runs / "locks"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{env}.lock"
    record = {"pid": os.getpid(), "process_start": process_start(os.getpid()), "host": socket.gethostname(), "task": task,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with _guarded(folder):
        holder = _read(path)
        if holder == {}:  # written under this guard, so never half-written but by a run that died
            say(f"clearing an unreadable lock on {env} (a run died while writing it)")
            path.unlink()
        elif holder is not None:
            elsewhere = holder.get("host") != record["host"]
            if elsewhere or owner_running(holder):
                # Another machine's process cannot be looked at from here: only its operator knows.
                raise DrydockError(
                    f"{env} is locked by {holder.get('task', 'another run')} (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, since {holder.get('started', '?')}): wait for it to finish"
                    + (f" (if that run is gone from {holder.get('host', '?')}, delete {path})" if elsewhere else ""))
            say(f"clearing a stale lock on {env} left by {holder.get('task')} (pid {holder.get('pid')}: that run is gone)")
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
    try:
        yield path
    finally:
        try:
            with _guarded(folder):
                if _read(path) == record:  # only our own: never a lock another run holds now
                    path.unlink()
        except DrydockError as error:  # the work is done: say so rather than fail it, or hide its error
            say(f"could not release the lock on {env} ({error}); the next command clears it as stale")
