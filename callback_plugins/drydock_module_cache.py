"""Callback: keep the module payloads Ansible builds from one ansible-playbook run to the next.

Before a module runs on a host, Ansible builds its payload (AnsiballZ): it parses the
module and every module_utils file it imports, `ansible.module_utils.basic` and about forty
more, and zips them. It keeps what it built only in the temporary folder of the one
ansible-playbook process, as `<local tmp>/ansiballz_cache`: every playbook builds each of
its modules anew, about 0.15 CPU-seconds apiece (docs/performance.md). This callback, at the
start of the playbook and before any task, makes that cache a link to a folder that outlives
the run, under $DRYDOCK_MODULE_CACHE.

Ansible names a cached payload by the module's name alone, so each folder is named by a key
of everything the payloads are built from: Ansible's and Python's versions, every file of
the module and module_utils paths drydock configures (by content), and the installed
Ansible and collections (by each file's size and time, or each collection's manifest). Code
that changes gets a new folder, never a payload built from the old. Folders of other keys go
once nobody has used them for a day. If anything here fails, Ansible builds as it always does.
"""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_module_cache
type: aggregate
short_description: Keep the module payloads Ansible builds between runs, keyed by the code they come from
description:
  - Links ansible-playbook's AnsiballZ cache to a folder under the directory named by the
    DRYDOCK_MODULE_CACHE environment variable, named by a hash of Ansible's and Python's
    versions, the configured module and module_utils paths' files and the installed
    collections; does nothing when it is unset.
"""

import hashlib
import os
import shutil
import stat
import sys
import time
from pathlib import Path

from ansible import constants as C
from ansible import release
from ansible.plugins.callback import CallbackBase

# A folder of another key (older code) goes once unused for this long: a run still using it
# would otherwise lose its cache in the middle, and its tasks would fail.
UNUSED_FOR_S = 24 * 3600
ANSIBLE_CACHE_NAME = "ansiballz_cache"  # the folder Ansible keeps its payloads in, in its local tmp


def _content(digest, folder: Path) -> None:
    """Every file under `folder` by name and content: code one edits."""
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{path.relative_to(folder)}\0".encode())
                digest.update(path.read_bytes())


def _installed(digest, folder: Path) -> None:
    """Every file under `folder` by name, size and time: installed code, rewritten by pip."""
    if folder.is_dir():
        for path in sorted(folder.rglob("*.py")):
            info = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())


def _collection_manifests(digest) -> None:
    """Each installed collection's manifest: a collection installed or upgraded rewrites it."""
    from ansible.utils.collection_loader import AnsibleCollectionConfig

    for root in AnsibleCollectionConfig.collection_paths:
        for manifest in sorted(Path(root).glob("ansible_collections/*/*/MANIFEST.json")):
            info = manifest.stat()
            digest.update(f"{manifest}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())


def cache_key(playbook_dir: Path | None) -> str:
    digest = hashlib.sha256(f"{release.__version__}\0{sys.version}\n".encode())
    ansible_dir = Path(release.__file__).resolve().parent
    for part in ("modules", "module_utils", "_internal", "executor"):
        _installed(digest, ansible_dir / part)
    _collection_manifests(digest)
    folders = [*C.DEFAULT_MODULE_PATH, *C.DEFAULT_MODULE_UTILS_PATH]
    if playbook_dir:
        folders += [playbook_dir / "library", playbook_dir / "module_utils"]
    for roles in C.DEFAULT_ROLES_PATH:
        for role in sorted(Path(roles).glob("*")):
            folders += [role / "library", role / "module_utils"]
    for folder in folders:
        digest.update(f"{folder}\n".encode())
        _content(digest, Path(folder))
    return digest.hexdigest()[:24]


def _private_folder(path: Path) -> Path:
    """`path`, made 0700 if missing, and only if it is a real folder of ours that nobody else
    may write to: its payloads run on the hosts, as root or the clusters' user."""
    missing, folder = [], path
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):  # runs/ itself too, if no run made it yet
        folder.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not a 0700 folder of this user")
    return path


def _drop_unused(base: Path, keep: str) -> None:
    for folder in base.iterdir():
        try:
            if folder.name != keep and time.time() - folder.lstat().st_mtime > UNUSED_FOR_S:
                shutil.rmtree(folder)
        except OSError:
            pass  # another run dropped it meanwhile, or it is not ours to drop


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "drydock_module_cache"
    CALLBACK_NEEDS_ENABLED = True

    def v2_playbook_on_start(self, playbook):
        base = os.environ.get("DRYDOCK_MODULE_CACHE")
        if not base:
            return
        try:
            key = cache_key(Path(playbook._basedir) if getattr(playbook, "_basedir", None) else None)
            base_folder = _private_folder(Path(base))
            folder = _private_folder(base_folder / key)
            os.utime(folder)  # in use: not dropped as unused
            link = Path(C.DEFAULT_LOCAL_TMP) / ANSIBLE_CACHE_NAME
            if not os.path.lexists(link):  # no task has run yet: nothing is in Ansible's own
                link.symlink_to(folder, target_is_directory=True)
            _drop_unused(base_folder, keep=key)
        except Exception as error:  # a cache only: whatever goes wrong, the run goes on without it
            self._display.warning(f"drydock_module_cache: building modules per run ({error})")
