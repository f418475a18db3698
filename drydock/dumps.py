"""Fetched dumps on the controller: backups/<env>/<timestamp>/{<db>-<timestamp>.dump.zst,manifest.json}
(.dump for gzip, pg_dump's own compression, and for dumps made before zstd)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from drydock.errors import DrydockError
from drydock.paths import backups_dir

# The folder each backup is fetched into: its UTC time (roles/pg_backup).
BACKUP_FOLDER = re.compile(r"\d{8}T\d{6}Z")


@dataclass(frozen=True)
class Dump:
    path: Path
    manifest: dict

    @property
    def source_env(self) -> str:
        return self.manifest["source"]["env"]

    @property
    def total_rows(self) -> int:
        return sum(self.manifest["row_counts"].values())

    @property
    def kind(self) -> str:
        """How drydock's lines name it: a safety backup (taken before a push replaced its
        environment's database, fetched into backups/<env>/safety/) or a dump."""
        return "safety backup" if self.path.parent.parent.name == "safety" else "dump"


def load(path: Path) -> Dump:
    """A dump and its manifest (a backup folder, or its manifest, stands for the dump in it);
    one-line errors for anything missing."""
    path = path.expanduser().resolve()
    if path.name == "manifest.json" and path.is_file():
        path = path.parent
    if path.is_dir():
        path = in_folder(path) or path
    if path.is_dir():
        # An environment's folder (backups/production) holds backups: name the newest.
        backups = sorted(sub for sub in path.glob("*/manifest.json") if in_folder(sub.parent))
        hint = f" (it holds backups: give one of them, e.g. {backups[-1].parent})" if backups else ""
        raise DrydockError(f"no dump file in the folder {path}{hint}")
    if not path.is_file():
        raise DrydockError(f"no such dump file or backup folder: {path}")
    manifest_path = path.parent / "manifest.json"
    if not manifest_path.is_file():
        raise DrydockError(f"no manifest.json beside {path}: drydock restores only dumps it can check")
    try:
        manifest = json.loads(manifest_path.read_text())
        # Everything drydock's commands read from it, so that a manifest missing a part is
        # refused here in one line, not halfway through a command.
        complete = (isinstance(manifest["source"]["env"], str) and isinstance(manifest["created"], str)
                    and isinstance(manifest["dump"]["sha256"], str) and isinstance(manifest["dump"]["size"], int)
                    and all(isinstance(rows, int) for rows in manifest["row_counts"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        complete = False
    if not complete:
        raise DrydockError(f"{manifest_path} is not a drydock manifest (or an incomplete one)")
    return Dump(path, manifest)


def in_folder(folder: Path) -> Path | None:
    """The dump file of a backup folder, if it has one."""
    files = sorted(path for pattern in ("*.dump", "*.dump.zst") for path in folder.glob(pattern))
    return files[-1] if files else None


def latest(env: str, root: Path | None = None, kind: str = "") -> Dump:
    """The newest complete fetched dump of `env` (of a `kind` such as "safety", if given)."""
    folder = (root or backups_dir()) / env
    if kind:
        folder = folder / kind
    # Only the folders backups are written to (a timestamp, as the rotation's BACKUP_NAME): a
    # copy kept under another name ("keep-before-release") would sort after them all.
    candidates = sorted((path for path in folder.glob("*/manifest.json") if BACKUP_FOLDER.fullmatch(path.parent.name)),
                        reverse=True) if folder.is_dir() else []
    for manifest_path in candidates:
        dump = in_folder(manifest_path.parent)
        if dump:
            return load(dump)
    raise DrydockError(f"no fetched dump of {env} under {folder}: run `inv backup {env}` first")
