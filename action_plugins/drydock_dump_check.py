"""Action: upload a dump to Ansible's temporary folder on the host, then run the
drydock_dump_check module on that copy (see library/drydock_dump_check.py).

Why not ansible.builtin.copy first: for a dump, it reads the file three more times than the
transfer does (sha1 of the source, sha1 of the upload on the host, and the copy into place),
before the check reads it once more for the sha256 the manifest records. Here the transfer
is the connection's own (sftp/scp, or a file copy for a local host), the check is the only
read, and the module unpacks or copies the checked dump straight to where pg_restore reads it.
"""
from __future__ import annotations

import os
import shlex

from ansible.plugins.action import ActionBase

UPLOAD_NAME = "drydock-upload.dump"
EARLIER_UPLOAD_NAME = "dump"  # drydock's uploads before 2026-12-05, stale ones cleared alike
# An upload in progress is written to without pause, and checked within minutes of its end.
STALE_UPLOAD_MINUTES = 60


class ActionModule(ActionBase):
    TRANSFERS_FILES = True  # Ansible makes the host's temporary folder before run()

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        source = args.pop("upload_from", None)
        try:
            if source:
                if not os.path.isfile(source):
                    return dict(result, failed=True, msg=f"no such file: {source}")
                upload = self._connection._shell.join_path(self._connection._shell.tmpdir, UPLOAD_NAME)
                self._transfer_file(source, upload)
                # Readable by the user the module becomes (setfacl, or chown), as for copy.
                self._fixup_perms2((self._connection._shell.tmpdir, upload), execute=False)
                args.update(path=upload, label=args.get("label") or source)
            result.update(self._execute_module(module_name="drydock_dump_check", module_args=args,
                                               task_vars=task_vars))
        finally:
            tmpdir = self._connection._shell.tmpdir
            if source and tmpdir and self._should_remove_tmp_path(tmpdir):
                result["stale_uploads_removed"] = self._remove_tmp_path_and_stale_uploads()
            else:
                self._remove_tmp_path(tmpdir)
        return result

    def _remove_tmp_path_and_stale_uploads(self) -> list[str]:
        """Remove this task's temporary folder, the upload with it, and in the same command
        the folders of uploads a killed run left beside it, an hour old: a dump no run reads
        again, production data perhaps. Returns those folders."""
        shell = self._connection._shell
        parent = os.path.dirname(shell.tmpdir.rstrip("/"))
        stale = [shlex.quote(shell.join_path(parent, "ansible-tmp-*", name))
                 for name in (UPLOAD_NAME, EARLIER_UPLOAD_NAME)]
        command = (f"{shell.remove(shell.tmpdir, recurse=True)}; find {shlex.quote(parent)} -mindepth 2 -maxdepth 2 "
                   f"-type f \\( -path {stale[0]} -o -path {stale[1]} \\) -mmin +{STALE_UPLOAD_MINUTES} -exec sh -c "
                   + shlex.quote('rm -rf -- "${1%/*}" && echo "${1%/*}"') + " sh {} \\; 2>/dev/null; true")
        done = self._low_level_execute_command(command, sudoable=False)
        shell.tmpdir = None
        return done.get("stdout", "").split()
