"""Action: fetch a dump to the controller, private from its first byte and checked by sha256.

Why not ansible.builtin.fetch: for a dump, it reads the file three more times than the
transfer does (sha1 on the host to decide whether to copy, then sha1 and md5 of the copy),
and the copy still needs a chmod and a sha256 of its own. This action uses the same
connection transfer (sftp/scp, or a file copy for a local host) and reads the copy once, for
the sha256 the manifest records. At 1 GB that is about a second of every backup.
"""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_fetch
short_description: Fetch a file from the host, 0600, and check its sha256
description:
  - Transfers C(src) from the host to C(dest).partial on the controller (mode 0600 from its
    creation), compares its sha256 with C(sha256) and renames it to C(dest). On any failure
    nothing is left at C(dest) or C(dest).partial.
  - Runs without become (a become fetch would read the whole file into memory).
options:
  src: {description: Path of the file on the host., type: path, required: true}
  dest: {description: Path of the copy on the controller; its folder must exist., type: path, required: true}
  sha256: {description: The checksum the host computed., type: str, required: true}
"""

import hashlib
import os

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible.utils.hashing import secure_hash


class ActionModule(ActionBase):
    TRANSFERS_FILES = True
    _VALID_ARGS = frozenset(("src", "dest", "sha256"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        missing = [name for name in ("src", "dest", "sha256") if not args.get(name)]
        if missing:
            return dict(result, failed=True, msg=f"drydock_fetch needs {', '.join(missing)}")
        if self._play_context.become:
            return dict(result, failed=True, msg="drydock_fetch runs without become: set become: false on the task")
        src = self._remote_expand_user(self._connection._shell.join_path(args["src"]))
        dest = os.path.abspath(os.path.expanduser(args["dest"]))
        partial = dest + ".partial"
        umask = os.umask(0o077)  # production data: 0600 from the first byte
        try:
            self._connection.fetch_file(src, partial)
            os.chmod(partial, 0o600)
            checksum = secure_hash(partial, hash_func=hashlib.sha256)
            if checksum != args["sha256"]:
                raise AnsibleError(f"the fetched dump's sha256 {checksum} differs from the host's {args['sha256']}: "
                                   "the transfer corrupted it")
            os.rename(partial, dest)
        except (AnsibleError, OSError) as error:
            if os.path.exists(partial):
                os.unlink(partial)
            return dict(result, failed=True, msg=" ".join(str(error).split()), dest=dest)
        finally:
            os.umask(umask)
        return dict(result, changed=True, dest=dest, checksum=checksum, size=os.path.getsize(dest))
