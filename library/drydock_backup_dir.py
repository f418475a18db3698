#!/usr/bin/python
"""Ansible module: make the host's backup folder private to the database's OS user, after a look at it."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_backup_dir
short_description: Make the host's backup folder (drydock_host_backup_dir) private to the OS user
description:
  - Runs as root (as the OS user itself with drydock_db_become false), because the folder's
    parent may be root's alone. Root would otherwise hand whatever the inventory names to the
    database's OS user, so the folder is looked at first, and refused when it is a link, not a
    folder, a shared folder (world-writable or sticky, such as /tmp) or another user's folder
    that holds files (such as /usr/local).
  - Makes the folder's missing parents as root would (mode from root's umask), the folder
    itself 0700, then gives it to the OS user and sets 0700 through a handle opened without
    following a link, so a link put in its place between the look and the change is refused.
options:
  path: {description: The folder (drydock_host_backup_dir)., type: path, required: true}
  owner: {description: The database's OS user (drydock_db_os_user)., type: str, required: true}
"""

EXAMPLES = r"""
- name: Make the host's backup folder
  drydock_backup_dir:
    path: /var/backups/drydock
    owner: postgres
  become: true
"""

RETURN = r"""
path: {description: The folder, its parents' links resolved., type: str, returned: success}
"""

import os
import pwd
import stat

from ansible.module_utils.basic import AnsibleModule

VARIABLE = "drydock_host_backup_dir"


def folder_path(module, given: str) -> str:
    """The folder with its parents' links and `..` resolved (the example inventory writes one);
    its last part is kept as it is, so that a link there is seen and refused."""
    given = given.rstrip("/")
    name = os.path.basename(given)
    if not os.path.isabs(given) or name in ("", ".", ".."):
        module.fail_json(msg=f"{VARIABLE} must be an absolute path that ends in a folder's name, not {given or '/'!r}")
    return os.path.join(os.path.realpath(os.path.dirname(given)), name)


def open_folder(module, path: str) -> tuple[int, bool]:
    """A handle on the folder, and whether it was made here (0700); a link or a file is refused."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            made = True
        except FileExistsError:
            made = False
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW), made
    except OSError as error:
        if os.path.islink(path):
            module.fail_json(msg=f"{VARIABLE} {path} is a link: drydock would follow it as root; write the folder "
                                 "it points to instead, or remove the link and the next run makes the folder")
        if os.path.lexists(path) and not os.path.isdir(path):
            module.fail_json(msg=f"{VARIABLE} {path} is not a folder")
        module.fail_json(msg=f"cannot make {VARIABLE} {path}: {error.strerror}")


def refusal(path: str, owner: str, owner_uid: int, folder: os.stat_result, holds_files: bool) -> str | None:
    """Why drydock must not take this existing folder for its dumps (None when it may)."""
    mode = stat.S_IMODE(folder.st_mode)
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        return (f"{VARIABLE} {path} is a shared folder (mode {mode:04o}): drydock would make it {owner}'s alone; "
                "write a folder of drydock's own, such as /var/backups/drydock")
    if folder.st_uid != owner_uid and holds_files:
        try:
            other = pwd.getpwuid(folder.st_uid).pw_name
        except KeyError:
            other = f"uid {folder.st_uid}"
        return (f"{VARIABLE} {path} is {other}'s and holds files: drydock would give it to {owner}; write a new "
                "or empty folder, such as /var/backups/drydock")
    return None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(path=dict(type="path", required=True), owner=dict(type="str", required=True)),
        supports_check_mode=False,
    )
    owner = module.params["owner"]
    try:
        owner_uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        module.fail_json(msg=f"drydock_db_os_user {owner} is not a user on this host")
    path = folder_path(module, module.params["path"])
    fd, changed = open_folder(module, path)
    try:
        folder = os.fstat(fd)
        why = refusal(path, owner, owner_uid, folder, holds_files=bool(os.listdir(fd)))
        if why:
            module.fail_json(msg=why)
        if folder.st_uid != owner_uid:
            os.fchown(fd, owner_uid, -1)
            changed = True
        if stat.S_IMODE(folder.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
            changed = True
    except OSError as error:
        module.fail_json(msg=f"cannot give {VARIABLE} {path} to {owner} with mode 0700: {error.strerror}")
    finally:
        os.close(fd)
    module.exit_json(changed=changed, path=path)


if __name__ == "__main__":
    main()
