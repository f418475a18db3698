"""Callback: keep the module payloads Ansible builds from one ansible-playbook run to the next.

Before a module runs on a host, Ansible builds its payload (AnsiballZ): it parses the
module and every module_utils file it imports, `ansible.module_utils.basic` and about forty
more, and zips them. It keeps what it built only in the temporary folder of the one
ansible-playbook process, as `<local tmp>/ansiballz_cache`: every playbook builds each of
its modules anew, about 0.15 CPU-seconds apiece (docs/performance.md). This callback, at the
start of the playbook and before any task, makes that cache a link to a folder that outlives
the run, under $DRYDOCK_MODULE_CACHE.

Ansible names a cached payload by the module's name (with its compression and extensions),
not by its code, so each folder is named by a key of what the payloads are built from:
Ansible's and Python's versions, every file of the module and module_utils folders Ansible
searches outside collections (by content), and the installed Ansible and collections (by
each file's size and time, or each collection's manifest). Code that changes gets a new
folder; code edited during a run loses what that run built. Where a name could mean two
files (which one, depends on the roles a playbook loads) or a folder links elsewhere,
nothing is cached.

The folders hold code that runs on the hosts as root, unpickled by Ansible here first: the
folder and each folder above it must be writable by this user (or root) alone. Each run
holds a shared lock on its folder; folders of other keys go once unused for a day and not
locked, and nothing else is ever deleted. If anything here fails, the playbook warns and
Ansible builds as it always does.
"""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_module_cache
type: aggregate
short_description: Keep the module payloads Ansible builds between runs, keyed by the code they come from
description:
  - Links ansible-playbook's AnsiballZ cache to a folder under the directory named by the
    DRYDOCK_MODULE_CACHE environment variable, named by a hash of Ansible's and Python's
    versions, the module and module_utils folders' files and the installed collections;
    does nothing when it is unset.
"""

import fcntl
import hashlib
import os
import pickle
import re
import shutil
import stat
import sys
import time
from pathlib import Path

from ansible import constants as C
from ansible import release
from ansible.plugins.callback import CallbackBase

ANSIBLE_CACHE_NAME = "ansiballz_cache"  # the folder Ansible keeps its payloads in, in its local tmp
IN_USE = ".in-use"  # in each key's folder: every run using it holds a shared lock on this file
# A folder of another key (older code) goes once unused for this long and not locked.
UNUSED_FOR_S = 24 * 3600
# Ansible writes a payload to `<name>-part` and renames it: one this old was left by a kill.
PART_LEFT_AFTER_S = 3600
KEY = re.compile(r"[0-9a-f]{24}")  # a key's folder
DROPPING = re.compile(r"\.dropping-[0-9a-f]{24}-[0-9]+")  # one moved aside to be deleted


class NotCached(Exception):
    """This playbook's modules cannot be cached safely: Ansible builds them per run."""


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted. A linked folder inside would be read by Ansible but
    not by rglob: refused rather than left out of the key."""
    found = []
    for parent, folders, names in os.walk(folder):
        for name in folders:
            if os.path.islink(os.path.join(parent, name)):
                raise NotCached(f"{os.path.join(parent, name)} links a folder")
        found += [Path(parent, name) for name in names]
    return sorted(path for path in found if "__pycache__" not in path.parts)


def _content(digest, folder: Path) -> None:
    """Every file under `folder` by name and content: code one edits."""
    for path in _files(folder):
        digest.update(f"{path.relative_to(folder)}\0".encode())
        digest.update(path.read_bytes())


def _installed(digest, folder: Path) -> None:
    """Every file under `folder` by name, size and time: installed code, rewritten by pip."""
    for path in _files(folder):
        info = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())


def _collections(digest) -> None:
    """Each collection by its manifest, which installing or upgrading it rewrites; one without
    (a source checkout) by its plugins' files."""
    from ansible.utils.collection_loader import AnsibleCollectionConfig

    for root in AnsibleCollectionConfig.collection_paths:
        for collection in sorted(Path(root).glob("ansible_collections/*/*")):
            manifest = collection / "MANIFEST.json"
            digest.update(f"{collection}\n".encode())
            if manifest.is_file():
                info = manifest.stat()
                digest.update(f"{info.st_size}\0{info.st_mtime_ns}\n".encode())
            else:
                _installed(digest, collection / "plugins")


def _searched_folders(playbook_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """The module and module_utils folders Ansible may search outside collections, resolved:
    its loaders' paths as they stand once the playbooks are loaded (the configured ones,
    Ansible's own, those beside every playbook on the command line or imported), and those
    of every role a play could load later (from the roles paths or beside the playbook)."""
    from ansible.plugins.loader import module_loader, module_utils_loader

    modules = [Path(folder) for folder in module_loader._get_paths()]
    module_utils = [Path(folder) for folder in module_utils_loader._get_paths(subdirs=False)]
    roles_paths = [Path(folder) for folder in C.DEFAULT_ROLES_PATH]
    if playbook_dir:
        roles_paths += [playbook_dir / "roles", playbook_dir]
    for roles in roles_paths:
        for role in sorted(roles.glob("*")):
            modules.append(role / "library")
            module_utils.append(role / "module_utils")

    def existing(folders: list[Path]) -> list[Path]:
        return list(dict.fromkeys(folder.resolve() for folder in folders if folder.is_dir()))

    return existing(modules), existing(module_utils)


def _refuse_a_name_in_two_places(folders: list[Path], name_of) -> None:
    """Ansible keeps one payload per module name (`ansible.legacy.<name>` whichever folder
    it came from) and one module_utils file per dotted name: which file a name meant could
    depend on the roles a playbook loads, so a name for two files is not cached."""
    seen: dict[str, Path] = {}
    for folder in folders:
        for path in _files(folder):
            if path.suffix == ".py":
                name, file = name_of(path.relative_to(folder)), path.resolve()
                if seen.setdefault(name, file) != file:
                    raise NotCached(f"{name} is both {seen[name]} and {file}")


def cache_key(playbook_dir: Path | None) -> str:
    digest = hashlib.sha256(f"{release.__version__}\0{sys.version}\n".encode())
    ansible_dir = Path(release.__file__).resolve().parent
    for part in ("modules", "module_utils", "_internal", "executor"):
        _installed(digest, ansible_dir / part)
    _collections(digest)
    modules, module_utils = _searched_folders(playbook_dir)
    # A module of ours named as one of Ansible's is cached under another name (ansible.legacy.x,
    # not ansible.modules.x): no clash there.
    _refuse_a_name_in_two_places([folder for folder in modules if not folder.is_relative_to(ansible_dir)],
                                 lambda path: path.stem)  # Ansible looks a module up by its file's name
    _refuse_a_name_in_two_places(module_utils, lambda path: ".".join(path.with_suffix("").parts))
    for folder in modules + module_utils:
        if not folder.is_relative_to(ansible_dir):  # Ansible's own: by size and time, above
            digest.update(f"{folder}\n".encode())
            _content(digest, folder)
    return digest.hexdigest()[:24]


def _check_ancestors(path: Path) -> None:
    """Every folder above `path` must be writable by this user or root alone (or be sticky,
    as /tmp is): anyone else could put another folder in its place after the checks here."""
    for folder in path.parents:
        info = folder.stat()
        if info.st_uid not in (0, os.geteuid()) or (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
            raise NotCached(f"{folder} is writable by other users")


def _private_folder(path: Path) -> Path:
    """`path`, made 0700 with any folder missing above it, and only if it is a real folder of
    this user that nobody else may write to."""
    missing, folder = [], path
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):  # runs/ itself too, if no run made it yet
        folder.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise NotCached(f"{path} is not a 0700 folder of this user")
    return path


def _hold(folder: Path) -> int:
    """A shared lock on the folder's IN_USE file, held until this process ends (its workers,
    forked from it, share it; the descriptor is never closed). Taken after a prune may have
    moved the folder: check it is still the one at its path."""
    fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        same = os.stat(folder / IN_USE).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise NotCached(f"{folder} was dropped as unused meanwhile")
    return fd


def _drop_unused(base: Path, keep: str) -> None:
    """Drop the folders of other keys no run has begun with for a day and none holds: moved
    aside under the lock first, so that a run starting meanwhile makes a new one. Only
    folders this callback made (a key's name, with its IN_USE file): DRYDOCK_MODULE_CACHE
    could name a folder holding anything."""
    for folder in base.iterdir():
        try:
            if DROPPING.fullmatch(folder.name) and not folder.is_symlink():  # a killed run's, moved aside
                shutil.rmtree(folder)
            if (folder.name == keep or not KEY.fullmatch(folder.name) or folder.is_symlink()
                    or not (folder / IN_USE).is_file() or time.time() - folder.stat().st_mtime < UNUSED_FOR_S):
                continue
            fd = os.open(folder / IN_USE, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                aside = base / f".dropping-{folder.name}-{os.getpid()}"
                folder.rename(aside)
            finally:
                os.close(fd)
            shutil.rmtree(aside)
        except OSError:
            pass  # in use, or another run is dropping it


def _drop_damaged(folder: Path) -> None:
    """A payload that does not load (written, renamed, then cut short by a crash before it
    reached the disk: Ansible does not sync it) would fail every later task of its module;
    a `-part` left by a killed run is clutter."""
    for entry in folder.iterdir():
        try:
            if entry.name.endswith("-part"):
                if time.time() - entry.lstat().st_mtime > PART_LEFT_AFTER_S:
                    entry.unlink()
            elif not entry.name.endswith(".lock") and entry.name != IN_USE:
                with entry.open("rb") as payload:
                    pickle.load(payload)  # what Ansible does with it: from our own 0700 folder
        except OSError:
            pass
        except Exception:  # cut short, or not a payload at all
            entry.unlink(missing_ok=True)


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "drydock_module_cache"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._key: str | None = None
        self._folder: Path | None = None
        self._playbook_dir: Path | None = None
        self._started = time.time()

    # Ansible 2.19 fails the playbook when a callback raises: nothing may escape these two.
    def v2_playbook_on_start(self, playbook):
        base = os.environ.get("DRYDOCK_MODULE_CACHE")
        if not base:
            return
        link = Path(C.DEFAULT_LOCAL_TMP) / ANSIBLE_CACHE_NAME
        if os.path.lexists(link) and not os.path.islink(link):
            return  # Ansible's own, from an earlier playbook of this command that was not cached
        try:
            self._playbook_dir = Path(playbook._basedir).resolve() if getattr(playbook, "_basedir", None) else None
            key = cache_key(self._playbook_dir)
            if os.path.lexists(link):  # made for an earlier playbook of this command
                if key != self._key:
                    raise NotCached("the playbooks of this command search different module folders")
                return
            base_folder = _private_folder(Path(base).resolve())
            _check_ancestors(base_folder)
            folder = _private_folder(base_folder / key)
            _hold(folder)  # until this process ends
            os.utime(folder)  # begun with now: not dropped as unused
            _drop_damaged(folder)
            link.symlink_to(folder, target_is_directory=True)  # absolute: resolved above
            self._key, self._folder = key, folder
        except Exception as error:  # a cache only: whatever goes wrong, the run goes on without it
            if os.path.islink(link):
                os.unlink(link)  # Ansible makes its own folder for the next module it builds
            self._display.warning(f"drydock_module_cache: building modules per run ({error})")
            return
        try:
            _drop_unused(base_folder, keep=key)
        except OSError:  # left for a later run: an exception here would fail the playbook (Ansible 2.19)
            pass

    def v2_playbook_on_stats(self, stats):
        """Ansible builds a payload when a task first needs it, from the code as it is then:
        code edited during the run would be kept under the key of the code before. The
        payloads built since the run began go then (another run may build them again)."""
        if self._folder is None:
            return
        try:
            changed = cache_key(self._playbook_dir) != self._key
        except Exception:
            changed = True
        if changed:
            try:
                for entry in self._folder.iterdir():
                    if entry.name != IN_USE and entry.lstat().st_mtime >= self._started - 1:
                        entry.unlink(missing_ok=True)
            except OSError as error:
                self._display.warning(f"drydock_module_cache: delete {self._folder} ({error})")
            self._display.warning("drydock_module_cache: module code changed during the run: "
                                  "the payloads it built are not kept")
