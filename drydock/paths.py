"""Where drydock keeps things, relative to the project root."""
import os
from pathlib import Path

PG_BINDIR = Path(os.environ.get("DRYDOCK_PG_BINDIR", "/usr/lib/postgresql/15/bin"))


def project_root() -> Path:
    return Path(os.environ.get("DRYDOCK_ROOT", Path(__file__).resolve().parent.parent))


def sandbox_dir() -> Path:
    return project_root() / ".sandbox"


def backups_dir() -> Path:
    return Path(os.environ.get("DRYDOCK_BACKUPS", project_root() / "backups"))


def runs_dir() -> Path:
    return Path(os.environ.get("DRYDOCK_RUNS", project_root() / "runs"))


def example_site_dir() -> Path:
    return project_root() / "examples" / "wagtail_site"
