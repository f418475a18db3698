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
from ansible.utils.display import Display

display = Display()

UPLOAD_NAME = "drydock-upload.dump"
# An upload in progress is written to without pause, and checked within minutes of its end.
STALE_UPLOAD_MINUTES = 60
NOT_REMOVED = "drydock-tmp-not-removed"


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
                if refusal := self._shared_upload_refusal():
                    return dict(result, failed=True, msg=refusal)
                upload = self._connection._shell.join_path(self._connection._shell.tmpdir, UPLOAD_NAME)
                # A local host's "transfer" is a file copy in this process, under its umask
                # (0644 with the usual 022): 0600 from the first byte, as the dump itself.
                umask = os.umask(0o077)
                try:
                    self._transfer_file(source, upload)
                finally:
                    os.umask(umask)
                # sftp and scp keep the source's mode (a --dump folder someone made 0644).
                # Before the fixup: a chmod after setfacl would narrow the ACL it set.
                self._remote_chmod([upload], "u=rw,go=")
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

    def _shared_upload_refusal(self) -> str | None:
        """Why the dump must not be uploaded: becoming an unprivileged user, Ansible hands the
        upload to it with setfacl, else with chown (connected as root), else, when told to,
        by making it readable to a whole group (common_remote_group) or by every user
        (allow_world_readable_tmpfiles). A dump is production data: neither is allowed."""
        if not self._is_become_unprivileged():
            return None
        if self.get_shell_option("world_readable_temp", default=False):
            to_whom = "every user (allow_world_readable_tmpfiles)"
        elif group := self.get_shell_option("common_remote_group", default=None):
            to_whom = f"the group {group} (common_remote_group)"
        else:
            return None
        become_user = self.get_become_option("become_user")
        return (f"refusing to upload a dump that Ansible is set to make readable to {to_whom} when it cannot"
                f" give it to {become_user} alone: unset that setting for these hosts (Ansible uses setfacl,"
                " which the acl package installs, or chown when it connects as root)")

    def _remove_tmp_path_and_stale_uploads(self) -> list[str]:
        """Remove this task's temporary folder, the upload with it, and in the same command
        the folders of uploads a killed run left beside it, an hour old, owned by the user
        drydock connects as or becomes: a dump no run reads again, production data perhaps.
        Returns those folders."""
        shell = self._connection._shell
        parent = os.path.dirname(shell.tmpdir.rstrip("/"))
        stale = shlex.quote(shell.join_path(parent, "ansible-tmp-*", UPLOAD_NAME))
        owners = '-user "$(id -u)"' + (f" -o -user {shlex.quote(self._task.become_user)}"
                                       if self._task.become and self._task.become_user else "")
        command = (f"{shell.remove(shell.tmpdir, recurse=True)} || echo {NOT_REMOVED}; "
                   f"find {shlex.quote(parent)} -mindepth 2 -maxdepth 2 -type f -path {stale} \\( {owners} \\) "
                   f"-mmin +{STALE_UPLOAD_MINUTES} -exec sh -c "
                   + shlex.quote('rm -rf -- "${1%/*}" && echo "${1%/*}"') + " sh {} \\; 2>/dev/null; true")
        lines = self._low_level_execute_command(command, sudoable=False).get("stdout", "").splitlines()
        if NOT_REMOVED in lines:  # as Ansible's own clean-up would: said, not failed
            display.warning(f"the upload could not be deleted with {shell.tmpdir} on the host: delete it")
        else:
            shell.tmpdir = None
        return [line for line in lines if line and line != NOT_REMOVED]
