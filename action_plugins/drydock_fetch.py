"""Action: fetch a dump to the controller, private from its first byte and checked by sha256,
and write its manifest beside it.

Why not ansible.builtin.fetch: for a dump, it reads the file three more times than the
transfer does (sha1 on the host to decide whether to copy, then sha1 and md5 of the copy),
and the copy still needs a chmod and a sha256 of its own. This action uses the same
connection transfer (sftp/scp, or a file copy for a local host) and reads the copy once, for
the sha256 the manifest records. At 1 GB that is about a second of every backup.

The controller's folders and the manifest are written here too, in the controller's own
process: as tasks delegated to localhost (`install -d`, `copy content=`) they started a
module each, about half a second of every backup.
"""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_fetch
short_description: Fetch a dump from the host, 0600, check its sha256 and write its manifest beside it
description:
  - Creates the folders from C(private_root) down to C(dest)'s, each 0700, and refuses a dump
    (C(manifest.dump.size)) bigger than the free space there.
  - Transfers C(src) from the host to C(dest).partial on the controller (mode 0600 from its
    creation), compares its sha256 with C(sha256) and renames it to C(dest).
  - Then writes C(manifest) as C(manifest.json) beside C(dest), 0600 (a dump without its
    manifest is an unfinished backup). On any failure none of these files is left.
  - Runs without become (a become fetch would read the whole file into memory).
options:
  src: {description: Path of the file on the host., type: path, required: true}
  dest: {description: Path of the copy on the controller., type: path, required: true}
  sha256: {description: The checksum the host computed., type: str, required: true}
  private_root: {description: "The controller's backup folder: it and every folder below it down to C(dest)'s are made 0700.", type: path, required: true}
  manifest: {description: The backup's manifest, written as JSON beside C(dest) once the dump is in place., type: dict, required: true}
  record: {description: "A file on the controller to write C({\"dump\": dest}) to (0600) once the backup is complete: how a caller learns which dump this run made.", type: path}
"""

import hashlib
import json
import os

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible.utils.hashing import secure_hash


class ActionModule(ActionBase):
    TRANSFERS_FILES = True
    REQUIRED = ("src", "dest", "sha256", "private_root", "manifest")
    _VALID_ARGS = frozenset((*REQUIRED, "record"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        missing = [name for name in self.REQUIRED if not args.get(name)]
        if missing:
            return dict(result, failed=True, msg=f"drydock_fetch needs {', '.join(missing)}")
        if self._play_context.become:
            return dict(result, failed=True, msg="drydock_fetch runs without become: set become: false on the task")
        src = self._remote_expand_user(self._connection._shell.join_path(args["src"]))
        dest = os.path.abspath(os.path.expanduser(args["dest"]))
        partial = dest + ".partial"
        manifest = os.path.join(os.path.dirname(dest), "manifest.json")
        umask = os.umask(0o077)  # production data: 0600 from the first byte
        try:
            manifest_text = json.dumps(args["manifest"], indent=2, sort_keys=True) + "\n"  # as to_nice_json(indent=2)
            make_private_folders(os.path.abspath(os.path.expanduser(args["private_root"])), os.path.dirname(dest))
            refuse_without_room(os.path.dirname(dest), int(args["manifest"].get("dump", {}).get("size", 0)), src)
            self._connection.fetch_file(src, partial)
            os.chmod(partial, 0o600)
            checksum = secure_hash(partial, hash_func=hashlib.sha256)
            if checksum != args["sha256"]:
                raise AnsibleError(f"the fetched dump's sha256 {checksum} differs from the host's {args['sha256']}: "
                                   "the transfer corrupted it")
            os.rename(partial, dest)
            write_private(manifest, manifest_text)  # last: a dump without its manifest is an unfinished backup
        except (AnsibleError, OSError, TypeError, ValueError) as error:
            for leftover in (partial, dest, manifest + ".partial"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            return dict(result, failed=True, msg=" ".join(str(error).split()), dest=dest)
        finally:
            os.umask(umask)
        if args.get("record"):
            # After the backup is whole: failing to say where it is must not delete it.
            try:
                write_private(os.path.expanduser(args["record"]), json.dumps({"dump": dest}) + "\n")
            except OSError as error:
                return dict(result, failed=True, dest=dest,
                            msg=f"the backup {dest} is complete, but its record could not be written: {error}")
        return dict(result, changed=True, dest=dest, checksum=checksum, size=os.path.getsize(dest))


def refuse_without_room(folder: str, size: int, src: str) -> None:
    """A fetch that would fill the controller's disk fails at its end, having filled it: refuse first."""
    disk = os.statvfs(folder)
    free = disk.f_bavail * disk.f_frsize
    if free < size:
        raise AnsibleError(f"not enough disk on the controller for the dump in {folder}: {free / 1e6:,.0f} MB free, "
                           f"{size / 1e6:,.0f} MB needed (the dump stays on the host: {src})")


def make_private_folders(root: str, folder: str) -> None:
    """Create `folder` and the folders between it and `root` (included), each 0700."""
    relative = os.path.relpath(folder, root)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise AnsibleError(f"{folder} is not inside the backup folder {root}")
    parts = [] if relative == os.curdir else relative.split(os.sep)
    if os.path.isdir(root) and os.stat(root).st_mode & 0o002:  # /tmp, say: it would lose its sticky bit
        raise AnsibleError(f"the backup folder {root} is one every user may write to: name a folder of its own "
                           "for pg_backup_controller_dir (it is made if missing)")
    for depth in range(len(parts) + 1):
        level = os.path.join(root, *parts[:depth])
        os.makedirs(level, mode=0o700, exist_ok=True)
        os.chmod(level, 0o700)


def write_private(path: str, text: str) -> None:
    """Write `text` to `path`, 0600, whole or not at all."""
    partial = path + ".partial"
    try:  # one a killed run left: made anew, so that it is 0600 and no link is followed
        os.unlink(partial)
    except FileNotFoundError:
        pass
    with open(partial, "w", encoding="utf-8",
              opener=lambda name, flags: os.open(name, flags | os.O_EXCL | os.O_NOFOLLOW, 0o600)) as out:
        out.write(text)
    os.rename(partial, path)
