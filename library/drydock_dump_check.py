#!/usr/bin/python
"""Ansible module: check an uploaded dump on the database host before anything changes."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_dump_check
short_description: Check a dump on the host that will restore it, and unpack it
description:
  - Compares the dump's sha256 with the manifest's, reads it with I(this host's)
    C(pg_restore --list) (a dump made by a newer C(pg_dump) fails here), and checks that the
    disk holding the server's data directory has room for the restored database beside the
    live one, and that the app role that will own the restored objects exists there.
    Changes no database; each failure is one line.
  - A zstd-compressed dump (C(unpack_to) given) is read through C(zstd -dc) for the check, then
    unpacked to C(unpack_to) once the disk has room for it (C(raw_size)), because
    C(pg_restore --jobs) needs a seekable archive; the compressed file at C(path) is deleted
    then. Nothing is left unpacked after a failure.
  - Also reports the server's TOAST compression methods, for the restore's session settings.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  path: {description: The dump on this host., type: path, required: true}
  label: {description: How to name the dump in messages (its path on the controller)., type: str}
  sha256: {description: The checksum the manifest records., type: str, required: true}
  app_role: {description: The role that will own the restored objects., type: str, required: true}
  pg_bindir: {description: Directory of pg_restore., type: path, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  needed_bytes: {description: Free bytes the restore needs beside the data directory., type: int, required: true}
  unpack_to: {description: "Unpack the zstd-compressed dump to this path (0600), replacing C(path).", type: path}
  raw_size: {description: Bytes the dump unpacks to (the manifest's C(dump.raw_size)); with C(unpack_to)., type: int}
"""

EXAMPLES = r"""
- name: Check the uploaded dump
  drydock_dump_check:
    path: /var/backups/drydock/incoming/wagtail_site__incoming.dump.zst
    unpack_to: /var/backups/drydock/incoming/wagtail_site__incoming.dump
    raw_size: 1553969833
    sha256: 3240c705b6df8a1d740cf2cef670e15c94b6a5f98a811423d4a08fc4bbcc800f
    app_role: wagtail_site
    pg_bindir: /usr/lib/postgresql/15/bin
    socket_dir: /var/run/postgresql
    port: 5432
    needed_bytes: 1288490188
"""

RETURN = r"""
toc_entries: {description: Entries pg_restore --list read., type: int, returned: success}
data_directory: {description: The server's data directory., type: str, returned: success}
free_bytes: {description: Free bytes on its disk., type: int, returned: success}
toast_compressions: {description: TOAST compression methods the server supports., type: list, returned: success}
"""

import os
import shutil
import subprocess

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.formatters import bytes_to_human
from ansible.module_utils.drydock_pg import connect, list_entries, require_psycopg, sha256_file


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(path=dict(type="path", required=True), label=dict(type="str"),
                           sha256=dict(type="str", required=True), app_role=dict(type="str", required=True),
                           pg_bindir=dict(type="path", required=True),
                           socket_dir=dict(type="path", required=True), port=dict(type="int", default=5432),
                           needed_bytes=dict(type="int", required=True), unpack_to=dict(type="path"),
                           raw_size=dict(type="int", default=0)),
        supports_check_mode=True,  # it checks, and unpacks only outside check mode
        required_by={"unpack_to": "raw_size"},
    )
    params = module.params
    require_psycopg(module)
    import psycopg

    path, label, unpack_to = params["path"], params["label"] or params["path"], params["unpack_to"]
    if unpack_to and not shutil.which("zstd"):
        module.fail_json(msg=f"zstd is not installed on this host, and {label} is compressed with it: "
                             "install it (apt install zstd)")
    actual = sha256_file(path)
    if actual != params["sha256"]:
        module.fail_json(msg=f"refusing {label}: its sha256 {actual} is not the manifest's {params['sha256']} "
                             "(truncated or corrupted)")
    try:
        toc_entries = list_entries(params["pg_bindir"], path, zstd=bool(unpack_to))
    except RuntimeError as error:
        module.fail_json(msg=f"this host's pg_restore cannot read {label}: {str(error).rsplit(': ', 1)[-1]}")
    try:
        with connect(params["socket_dir"], params["port"], "postgres") as conn:
            data_directory = conn.execute("SHOW data_directory").fetchone()[0]
            toast = conn.execute("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'").fetchone()
            role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (params["app_role"],)).fetchone()
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    if role is None:
        module.fail_json(msg=f"the app role {params['app_role']} does not exist on this server: create it first "
                             "(it owns everything restored)")
    free = free_bytes(data_directory)
    if free < params["needed_bytes"]:
        module.fail_json(msg=f"not enough disk for the restore: {bytes_to_human(free)} free, "
                             f"{bytes_to_human(params['needed_bytes'])} needed (the database is restored "
                             "beside the live one)")
    if unpack_to and not module.check_mode:
        unpack(module, path, unpack_to, params["raw_size"],
               params["needed_bytes"] if same_disk(data_directory, unpack_to) else 0, label)
    module.exit_json(changed=bool(unpack_to) and not module.check_mode, toc_entries=toc_entries, data_directory=data_directory,
                     free_bytes=free, toast_compressions=list(toast[0]) if toast else [])


def free_bytes(path: str) -> int:
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize


def same_disk(data_directory: str, unpack_to: str) -> bool:
    return os.stat(data_directory).st_dev == os.stat(os.path.dirname(unpack_to)).st_dev


def unpack(module, path: str, target: str, raw_size: int, restore_bytes: int, label: str) -> None:
    """Unpack the checked dump for pg_restore, if the disk has room for it beside the restore
    (restore_bytes when both share a disk), and delete the compressed file."""
    free = free_bytes(os.path.dirname(target))
    if free < raw_size + restore_bytes:
        module.fail_json(msg=f"not enough disk to unpack {label}: {bytes_to_human(free)} free, "
                             f"{bytes_to_human(raw_size + restore_bytes)} needed (the unpacked archive"
                             f"{' and the restored database' if restore_bytes else ''})")
    os.umask(0o077)  # production data
    proc = subprocess.run(["zstd", "-d", "-q", "-f", "-o", target, "--", path], capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(target):
            os.unlink(target)
        module.fail_json(msg=f"cannot unpack {label}: {' '.join(proc.stderr.split()) or proc.returncode}")
    os.unlink(path)


if __name__ == "__main__":
    main()
