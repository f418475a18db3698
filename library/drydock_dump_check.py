#!/usr/bin/python
"""Ansible module: check a dump on the database host before anything changes, and place it for pg_restore."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_dump_check
short_description: Check a dump on the host that will restore it, and place it for pg_restore
description:
  - Compares the dump's sha256 with the manifest's, reads it with I(this host's)
    C(pg_restore --list) (a dump made by a newer C(pg_dump) fails here), and checks that the
    disk holding the server's data directory has room for the restored database beside the
    live one, and that the app role that will own the restored objects exists there.
    Changes no database; each failure is one line.
  - With C(archive), the checked dump is then placed there for pg_restore:
    a zstd-compressed one (C(zstd)) is unpacked, because C(pg_restore --jobs) needs a
    seekable archive, once the disk has room for C(raw_size); a plain one is copied. The
    placed archive then gets the data offsets a dump written through a pipe lacks, so
    pg_restore can start the biggest tables first (module_utils/drydock_archive.py). The
    file at C(path) is left alone, and nothing is left at C(archive) after a failure.
  - The action plugin of the same name uploads C(upload_from) (a file on the controller) to
    Ansible's temporary folder on the host first and checks that copy: one transfer and one
    read for the sha256, where C(ansible.builtin.copy) reads the file three more times.
  - Also reports the server's TOAST compression methods, for the restore's session settings,
    and whether C(side_database) exists (an interrupted run's, to be dropped first).
  - Connects over the local socket as the current OS user (peer authentication).
options:
  path: {description: "The dump on this host; with C(upload_from), the action sets it to the upload.", type: path, required: true}
  upload_from:
    description: "Handled by the action: upload this dump from the controller first, and delete the upload afterwards."
    type: path
  label: {description: How to name the dump in messages (its path on the controller)., type: str}
  sha256: {description: The checksum the manifest records., type: str, required: true}
  app_role: {description: The role that will own the restored objects., type: str, required: true}
  pg_bindir: {description: Directory of pg_restore., type: path, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  needed_bytes: {description: Free bytes the restore needs beside the data directory., type: int, required: true}
  archive: {description: Where to place the checked archive for pg_restore (0600)., type: path}
  zstd: {description: The dump is compressed with zstd (the manifest's C(dump.compression))., type: bool, default: false}
  raw_size: {description: "Bytes the dump unpacks to (the manifest's C(dump.raw_size)); required with C(zstd) and C(archive).", type: int, default: 0}
  side_database: {description: The database the dump will be restored into; reported on with C(side_database_exists)., type: str}
"""

EXAMPLES = r"""
- name: Upload the dump, check it and unpack it for pg_restore
  drydock_dump_check:
    upload_from: /srv/drydock/backups/local/20261121T120000Z/wagtail_site-20261121T120000Z.dump.zst
    archive: /var/backups/drydock/incoming/wagtail_site__incoming.dump
    zstd: true
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
side_database_exists: {description: Whether C(side_database) exists already., type: bool, returned: when side_database is given}
offsets_added: {description: TOC entries that got their data offset when the archive was placed., type: int, returned: success}
"""

import os
import shutil
import subprocess

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.formatters import bytes_to_human
from ansible.module_utils.drydock_archive import ArchiveFormatError, add_data_offsets
from ansible.module_utils.drydock_pg import (ZSTD_DAMAGE_SIGNS, DoesNotUnpack, connect, free_bytes, list_entries,
                                             require_psycopg, sha256_file, zstd_reason)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(path=dict(type="path", required=True), upload_from=dict(type="path"), label=dict(type="str"),
                           sha256=dict(type="str", required=True), app_role=dict(type="str", required=True),
                           pg_bindir=dict(type="path", required=True),
                           socket_dir=dict(type="path", required=True), port=dict(type="int", default=5432),
                           needed_bytes=dict(type="int", required=True), archive=dict(type="path"),
                           zstd=dict(type="bool", default=False), raw_size=dict(type="int", default=0),
                           side_database=dict(type="str")),
        supports_check_mode=True,  # it checks, and places the archive only outside check mode
    )
    params = module.params
    require_psycopg(module)
    import psycopg

    path, label, archive = params["path"], params["label"] or params["path"], params["archive"]
    if params["zstd"] and archive and params["raw_size"] <= 0:
        module.fail_json(msg=f"the manifest of {label} does not say what it unpacks to (dump.raw_size): "
                             "cannot check the disk for it")
    if params["zstd"] and not shutil.which("zstd"):
        module.fail_json(msg=f"zstd is not installed on this host, and {label} is compressed with it: "
                             "install it (apt install zstd)")
    actual = sha256_file(path)
    if actual != params["sha256"]:
        module.fail_json(msg=f"refusing {label}: its sha256 {actual} is not the manifest's {params['sha256']} "
                             "(truncated or corrupted)")
    try:
        toc_entries = list_entries(params["pg_bindir"], path, zstd=params["zstd"])
    except DoesNotUnpack as error:
        refuse_damaged(module, label, error)
    except RuntimeError as error:
        module.fail_json(msg=f"this host's pg_restore cannot read {label}: {str(error).rsplit(': ', 1)[-1]}")
    try:
        with connect(params["socket_dir"], params["port"], "postgres") as conn:
            data_directory = conn.execute("SHOW data_directory").fetchone()[0]
            toast = conn.execute("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'").fetchone()
            role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (params["app_role"],)).fetchone()
            side = params["side_database"] and conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (params["side_database"],)).fetchone()
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    if role is None:
        module.fail_json(msg=f"the app role {params['app_role']} does not exist on this server: create it first "
                             "(it owns everything restored)")
    free = free_bytes(data_directory)
    if free < params["needed_bytes"]:
        module.fail_json(msg=f"not enough disk for the restore: {bytes_to_human(free)} free, "
                             f"{bytes_to_human(params['needed_bytes'])} needed (the database is restored "
                             "beside the live one: its size × pg_restore_disk_margin)")
    offsets_added = 0
    if archive and not module.check_mode:
        os.umask(0o077)  # production data
        offsets_added = place(module, path, archive, params["raw_size"] if params["zstd"] else os.path.getsize(path),
                              params["needed_bytes"], data_directory, params["zstd"], label)
    facts = dict(toc_entries=toc_entries, offsets_added=offsets_added, data_directory=data_directory, free_bytes=free,
                 toast_compressions=list(toast[0]) if toast else [])
    if params["side_database"]:
        facts["side_database_exists"] = bool(side)
    module.exit_json(changed=bool(archive) and not module.check_mode, **facts)


def place(module, path: str, archive: str, size: int, restore_bytes: int, data_directory: str, zstd: bool,
          label: str) -> int:
    """Put the checked dump at `archive` for pg_restore, unpacked if it is zstd-compressed, when
    its disk has room for it (and for the restore, if the data directory shares that disk), and
    give it the data offsets a piped dump lacks. Returns how many entries got one."""
    folder = os.path.dirname(archive)
    # Made here as the OS user, never root (the role says why). A link is refused whoever runs
    # this and wherever it points: the folder is drydock's own, and always a real one.
    if os.path.islink(folder):
        module.fail_json(msg=f"cannot use {folder} for pg_restore's archive: it is a link: remove it, and the next "
                             "run makes the folder")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # 0700 even if it was there before
    except OSError as error:
        if os.path.isdir(folder) and os.stat(folder).st_uid != os.geteuid():
            module.fail_json(msg=f"cannot use {folder} for pg_restore's archive: it is not a folder of this OS user "
                                 f"({error}): remove it, and the next run makes the folder")
        module.fail_json(msg=f"cannot make the folder for pg_restore's archive: {error} (pg_restore_host_dir:"
                             f" its parent must be the OS user's, as drydock_host_backup_dir is)")
    discard(archive)  # an interrupted run's: it does not count as used space
    same_disk = os.stat(data_directory).st_dev == os.stat(folder).st_dev
    needed = size + (restore_bytes if same_disk else 0)
    free = free_bytes(folder)
    if free < needed:
        module.fail_json(msg=f"not enough disk to {'unpack' if zstd else 'copy'} {label} for pg_restore: "
                             f"{bytes_to_human(free)} free, {bytes_to_human(needed)} needed (the archive"
                             f"{' and the restored database' if same_disk else ''})")
    try:
        # 0600 from the first byte: zstd -o would give the archive the upload's mode.
        with open(archive, "wb", opener=lambda name, flags: os.open(name, flags, 0o600)) as target:
            if zstd:
                proc = subprocess.run(["zstd", "-d", "-c", "-q", "--", path], stdout=target, stderr=subprocess.PIPE,
                                      text=True, check=False)
                if proc.returncode != 0:
                    reason = zstd_reason(proc.stderr) or f"exit status {proc.returncode}"
                    if proc.returncode > 0 and any(sign in reason for sign in ZSTD_DAMAGE_SIGNS):
                        raise DoesNotUnpack(f"zstd: {reason}")
                    raise OSError(f"zstd: {reason}")  # the disk, memory, a signal: not the dump
            else:
                with open(path, "rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)
        return add_data_offsets(archive)
    except DoesNotUnpack as error:
        discard(archive)
        refuse_damaged(module, label, error)
    except ArchiveFormatError as error:
        discard(archive)
        module.fail_json(msg=f"refusing {label}: its data does not match its table of contents ({error})")
    except OSError as error:
        discard(archive)
        module.fail_json(msg=f"cannot place {label} for pg_restore: {error}")


def refuse_damaged(module, label: str, error: DoesNotUnpack) -> None:
    """Its sha256 was right, yet zstd cannot decompress it (its start, which pg_restore --list
    reads, or further on, as it is placed for pg_restore)."""
    module.fail_json(msg=f"refusing {label}: it does not unpack ({error}), though its sha256 is the "
                         "manifest's: it was damaged before its manifest was written")


def discard(archive: str) -> None:
    if os.path.exists(archive):
        os.unlink(archive)


if __name__ == "__main__":
    main()
