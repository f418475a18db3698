"""Where drydock keeps things, relative to the project root."""
import os
from pathlib import Path

PG_BINDIR = Path(os.environ.get("DRYDOCK_PG_BINDIR", "/usr/lib/postgresql/15/bin"))


def no_world_writable_files() -> None:
    """Keep group and others from writing what drydock's tools make without a mode of their
    own: the sandbox's app script and pid records, a test shard's copy of the checkout. root
    runs or trusts them later, so a umask of 000 would let any local user change what root
    runs or stops. Called by each entry point (tasks.py, the tests' conftest)."""
    os.umask(os.umask(0) | 0o022)


def project_root() -> Path:
    return Path(os.environ.get("DRYDOCK_ROOT", Path(__file__).resolve().parent.parent))


def sandbox_dir() -> Path:
    return project_root() / ".sandbox"


def backups_dir() -> Path:
    return _folder("DRYDOCK_BACKUPS", "backups")


def runs_dir() -> Path:
    return _folder("DRYDOCK_RUNS", "runs")


def _folder(variable: str, default: str) -> Path:
    """The folder the environment variable names (relative to where drydock was started; empty
    counts as unset), or the checkout's own: absolute, as Ansible, started elsewhere, gets it."""
    return Path(os.environ.get(variable) or project_root() / default).absolute()


def example_site_dir() -> Path:
    return project_root() / "examples" / "wagtail_site"


def refuse_unfit_folders() -> None:
    """drydock makes its folders as it needs them, and makes runs/ and backups/ private
    (0700): one that is a file (a DRYDOCK_RUNS or DRYDOCK_BACKUPS mistyped) would fail it
    half-way, after a dump on the host; one every user may write to (/tmp, say) would lose its
    sticky bit and its mode to that, and is no place for locks another user could plant."""
    from drydock.errors import DrydockError

    for name, folder in (("DRYDOCK_RUNS", runs_dir()), ("DRYDOCK_BACKUPS", backups_dir())):
        if not folder.exists():
            continue
        source = f"{name}={os.environ[name]}" if os.environ.get(name) else str(folder)
        kept = "runs and locks" if name == "DRYDOCK_RUNS" else "backups"
        if not folder.is_dir():
            raise DrydockError(f"{source} is not a folder: drydock keeps its {kept} there; name a folder "
                               "(it is made if missing)")
        if folder.stat().st_mode & 0o002:
            raise DrydockError(f"{source} is a folder every user may write to: drydock keeps its {kept} there, "
                               "private (0700); name a folder of its own (it is made if missing)")
