#!/usr/bin/python
"""Ansible module: make the host's backup folder private to the database's OS user, after a look at it."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_backup_dir
short_description: Make the host's backup folder (drydock_host_backup_dir) private to the OS user
description:
  - Runs as root (as the OS user itself with drydock_db_become false), because the folder's
    parent may be root's alone. Root would otherwise hand whatever the path leads to to the
    database's OS user, so the path is looked at first.
  - A link on the way is followed only when root (or the user running this) made it in a
    folder no one else can change; one the OS user could have put there is refused, as it
    could send root anywhere. The path is then walked from / without following any link, so
    a link swapped in meanwhile is refused too.
  - Missing folders on the way are made root's, 0755, whatever root's umask; a folder on the
    way the OS user cannot enter is refused, as the dump would fail there.
  - The folder itself is refused when it is a link, a shared folder (world-writable or
    sticky, such as /tmp), another user's that holds files (such as /usr/local) or a folder at
    the top of the machine (such as /srv) that is not the OS user's already. Otherwise it is
    made (0700) or taken, given to the OS user and set to 0700 through the handle the look used.
  - In check mode it looks, and changes nothing.
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
path: {description: The folder, its trusted links followed., type: str, returned: success}
"""

import errno
import os
import pwd
import stat

from ansible.module_utils.basic import AnsibleModule

VARIABLE = "drydock_host_backup_dir"
MAX_LINKS = 40  # as the kernel's own limit on a path's links
FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class Refused(Exception):
    """Why the folder is not drydock's to make or take, in one line."""


def name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def holds_steady(folder: os.stat_result, trusted: set[int]) -> bool:
    """Whether only trusted users can replace what `folder` holds: it is theirs, and no one
    else may write in it but, with the sticky bit, to their own entries."""
    writable_by_others = folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return folder.st_uid in trusted and (not writable_by_others or bool(folder.st_mode & stat.S_ISVTX))


def resolve(given: str, trusted: set[int]) -> str:
    """`given`'s parent with its links and `..` resolved, as realpath would, and its last part
    as written (a link there is refused later). A link is followed only when it and the
    folder holding it are trusted users'; parts that do not exist yet are kept as written."""
    name = os.path.basename(given)
    pending = [part for part in os.path.dirname(given).split("/") if part not in ("", ".")]
    resolved, followed = "/", 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        try:
            details = os.lstat(candidate)
        except FileNotFoundError:
            resolved = candidate
            continue
        if stat.S_ISLNK(details.st_mode):
            if details.st_uid not in trusted or not holds_steady(os.lstat(resolved), trusted):
                raise Refused(f"{VARIABLE} {given} goes through {candidate}, a link that {name_of(details.st_uid)} "
                              f"could have put there or can change: drydock would follow it as root; write the path "
                              f"of the folder it points to ({os.path.realpath(candidate)}) instead")
            followed += 1
            if followed > MAX_LINKS:
                raise Refused(f"{VARIABLE} {given} goes through too many links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = "/"
            pending[:0] = [piece for piece in target.split("/") if piece not in ("", ".")]
            continue
        if not stat.S_ISDIR(details.st_mode):
            raise Refused(f"{VARIABLE} {given} goes through {candidate}, which is not a folder")
        resolved = candidate
    return os.path.join(resolved, name)


def can_enter(folder: os.stat_result, owner: pwd.struct_passwd, groups: list[int]) -> bool:
    """Whether the OS user (in `groups`) may pass through `folder`."""
    if owner.pw_uid == 0:
        return True
    if folder.st_uid == owner.pw_uid:
        return bool(folder.st_mode & stat.S_IXUSR)
    return bool(folder.st_mode & (stat.S_IXGRP if folder.st_gid in groups else stat.S_IXOTH))


def open_step(fd: int, part: str, subject: str, make: bool, mode: int) -> tuple[int | None, bool]:
    """A handle on `part` of the folder `fd`, made with `mode` when missing and `make`; never
    through a link. (None, False) when it is missing and not to be made. `subject` starts the
    refusal: what `part` is to the user ("drydock_host_backup_dir /p goes through /x, which")."""
    made = False
    if make:
        try:
            os.mkdir(part, mode, dir_fd=fd)
            made = True
        except FileExistsError:
            pass
    try:
        return os.open(part, FOLDER, dir_fd=fd), made
    except FileNotFoundError:
        if make:
            raise
        return None, False
    except OSError as error:
        # A link there fails as ELOOP, or as ENOTDIR when it points nowhere or to a file.
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
            raise Refused(f"{subject} is a link (to {os.readlink(part, dir_fd=fd)}): drydock would follow it as "
                          "root; write a real folder's path instead, or remove the link and the next run makes the "
                          "folder") from None
        if error.errno == errno.ENOTDIR:
            raise Refused(f"{subject} is not a folder") from None
        raise


def walk_to_parent(path: str, owner: pwd.struct_passwd, groups: list[int], make: bool) -> int | None:
    """A handle on `path`'s parent, walked from / without following a link (one swapped in
    since `resolve` looked is refused), its missing folders made root's, 0755, whatever the
    umask. Each folder on the way must let the OS user through. None when one is missing in
    check mode."""
    fd, here = os.open("/", os.O_RDONLY | os.O_DIRECTORY), "/"
    try:
        for part in [part for part in os.path.dirname(path).split("/") if part]:
            here = os.path.join(here, part)
            child, made = open_step(fd, part, f"{VARIABLE} {path} goes through {here}, which", make, 0o755)
            os.close(fd)
            fd = child
            if fd is None:
                return None
            if made:
                os.fchmod(fd, 0o755)
            details = os.fstat(fd)
            if not can_enter(details, owner, groups):
                raise Refused(f"{VARIABLE} {path}: {owner.pw_name} cannot enter {here} ({name_of(details.st_uid)}'s, "
                              f"mode {stat.S_IMODE(details.st_mode):04o}), so its dumps there would fail: write a folder "
                              f"it can reach, or let it through (chmod o+x {here})")
        return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def refusal(path: str, owner: str, owner_uid: int, folder: os.stat_result, holds_files: bool) -> str | None:
    """Why drydock must not take this existing folder for its dumps (None when it may)."""
    mode = stat.S_IMODE(folder.st_mode)
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        return (f"{VARIABLE} {path} is a shared folder (mode {mode:04o}): drydock would make it {owner}'s alone; "
                "write a folder of drydock's own, such as /var/backups/drydock")
    if folder.st_uid != owner_uid and os.path.dirname(path) == "/":
        return (f"{VARIABLE} {path} is a folder at the top of the machine, {name_of(folder.st_uid)}'s: drydock "
                f"would make it {owner}'s alone; write a folder in it, such as {path}/drydock")
    if folder.st_uid != owner_uid and holds_files:
        return (f"{VARIABLE} {path} is {name_of(folder.st_uid)}'s and holds files: drydock would give it to {owner}; "
                f"write a new or empty folder, such as /var/backups/drydock (or, if it is meant for the dumps, a disk "
                f"mounted there, chown {owner} it yourself)")
    return None


def make_private(path: str, owner: pwd.struct_passwd, check_mode: bool) -> bool:
    """Look at the folder, then make or take it and give it to `owner`, 0700; whether it changed."""
    parent = walk_to_parent(path, owner, os.getgrouplist(owner.pw_name, owner.pw_gid), make=not check_mode)
    if parent is None:
        return True  # check mode: a folder on the way is missing, and would be made
    try:
        fd, made = open_step(parent, os.path.basename(path), f"{VARIABLE} {path}", not check_mode, 0o700)
    finally:
        os.close(parent)
    if fd is None:
        return True
    try:
        folder = os.fstat(fd)
        # One made just now is drydock's own (a new /drydock too).
        why = None if made else refusal(path, owner.pw_name, owner.pw_uid, folder, holds_files=bool(os.listdir(fd)))
        if why:
            raise Refused(why)
        changed = made
        if folder.st_uid != owner.pw_uid:
            changed = True
            if not check_mode:
                os.fchown(fd, owner.pw_uid, -1)
        if stat.S_IMODE(folder.st_mode) != 0o700:
            changed = True
            if not check_mode:
                os.fchmod(fd, 0o700)
        return changed
    finally:
        os.close(fd)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(path=dict(type="path", required=True), owner=dict(type="str", required=True)),
        supports_check_mode=True,
    )
    given = module.params["path"].rstrip("/")
    if not os.path.isabs(given) or os.path.basename(given) in ("", ".", ".."):
        module.fail_json(msg=f"{VARIABLE} must be an absolute path that ends in a folder's name, not {given or '/'!r}")
    try:
        owner = pwd.getpwnam(module.params["owner"])
    except KeyError:
        module.fail_json(msg=f"drydock_db_os_user {module.params['owner']} is not a user on this host")
    runner = name_of(os.geteuid())
    try:
        path = resolve(given, trusted={0, os.geteuid()})
        changed = make_private(path, owner, module.check_mode)
    except Refused as why:
        module.fail_json(msg=str(why))
    except OSError as error:
        hint = ("" if os.geteuid() == 0 else
                f" (made as {runner}, as drydock_db_become is false: make it yourself, {owner.pw_name}'s, or set "
                "drydock_db_become: true)")
        module.fail_json(msg=f"cannot make {VARIABLE} {given} {owner.pw_name}'s, 0700: {error.strerror}"
                             f"{' (' + error.filename + ')' if error.filename else ''}{hint}")
    module.exit_json(changed=changed, path=path)


if __name__ == "__main__":
    main()
