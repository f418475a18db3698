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

from ansible.plugins.action import ActionBase


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
                upload = self._connection._shell.join_path(self._connection._shell.tmpdir, "dump")
                self._transfer_file(source, upload)
                # Readable by the user the module becomes (setfacl, or chown), as for copy.
                self._fixup_perms2((self._connection._shell.tmpdir, upload), execute=False)
                args.update(path=upload, label=args.get("label") or source)
            result.update(self._execute_module(module_name="drydock_dump_check", module_args=args,
                                               task_vars=task_vars))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)  # the upload with it
        return result
