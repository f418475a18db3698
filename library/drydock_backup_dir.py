#!/usr/bin/python
"""Ansible module: make the host's backup folder private to the database's OS user, after a look at it."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_backup_dir
short_description: Make the host's backup folder (drydock_host_backup_dir) private to the OS user
description:
  - Runs as root (as the OS user itself with drydock_db_become false), because the folder's
    parent may be root's alone. Root would otherwise hand whatever the path leads to to the
    database's OS user, who is trusted less than root, so the way there is looked at first.
  - The path is walked from / one folder at a time, each opened from the handle of the one
    before without following a link, so nothing swapped in behind the walk is used.
  - A link on the way is followed only when root (or the user running this) made it, in a
    folder only they can change; one the OS user could have made or replaced could send root
    anywhere. Every folder on the way must let the OS user through, and none may be one that
    another user (not root, the runner or the OS user) can change, unless it is sticky and
    root's, the runner's or the OS user's.
  - Missing folders on the way are made root's, 0755, whatever the umask.
  - The folder itself is refused when it is a link, not a folder, a shared folder
    (world-writable or sticky, such as /tmp), another user's than root's, the runner's or the
    OS user's, root's and holding files (such as /usr/local), or an existing folder at the
    top of the machine (such as /srv) that is not the OS user's already. Otherwise it is made (0700) or taken, then given to the OS user and
    set to 0700 through the handle the look used.
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
folder: {description: "The folder, trusted links followed (its path as written may go through them).", type: str,
         returned: success}
"""

import errno
import grp
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


def writers(folder: os.stat_result, keepers: set[int]) -> str | None:
    """Who, beyond `keepers`, can change what `folder` holds (None: no one)."""
    if folder.st_uid not in keepers:
        return name_of(folder.st_uid)
    if folder.st_mode & stat.S_IWOTH:
        return "every user"
    if folder.st_mode & stat.S_IWGRP:
        try:
            return f"the group {grp.getgrgid(folder.st_gid).gr_name}"
        except KeyError:
            return f"the group {folder.st_gid}"
    return None


def can_enter(folder: os.stat_result, owner: pwd.struct_passwd, groups: list[int]) -> bool:
    """Whether the OS user (in `groups`) may pass through `folder`."""
    if owner.pw_uid == 0:
        return True
    if folder.st_uid == owner.pw_uid:
        return bool(folder.st_mode & stat.S_IXUSR)
    return bool(folder.st_mode & (stat.S_IXGRP if folder.st_gid in groups else stat.S_IXOTH))


class Walk:
    """The folders from / to the backup folder, each held open: `stack` holds (handle, path)."""

    def __init__(self, given: str, owner: pwd.struct_passwd, make: bool):
        self.given, self.owner, self.make = given, owner, make
        self.groups = os.getgrouplist(owner.pw_name, owner.pw_gid)
        self.trusted = {0, os.geteuid()}
        self.stack = [(os.open("/", os.O_RDONLY | os.O_DIRECTORY), "/")]
        self.made = False  # whether the last folder on the stack was made by this walk

    def close(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[0])

    def shown(self, here: str) -> str:
        return self.given if here == self.given else f"{self.given} (that is, {here})"

    def to_folder(self) -> bool:
        """Walk to the backup folder, making what is missing; False in check mode when
        something is missing (it would be made)."""
        pending = [part for part in self.given.split("/") if part]
        followed = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
                continue
            fd, where = self.stack[-1]
            here, last = os.path.join(where, part), not pending
            subject = f"{VARIABLE} {self.shown(here)}" if last else f"{VARIABLE} {self.given} goes through {here}, which"
            opened = self.open(fd, part, here, subject, last, ".." in pending)
            if opened is None:
                return False
            if isinstance(opened, str):  # a link, trusted: go on along its target
                followed += 1
                if followed > MAX_LINKS:
                    raise Refused(f"{VARIABLE} {self.given} goes through too many links")
                if opened.startswith("/"):
                    while len(self.stack) > 1:
                        os.close(self.stack.pop()[0])
                pending[:0] = [piece for piece in opened.split("/") if piece not in ("", ".")]
                continue
            self.stack.append((opened, here))
            if not last:
                self.check_on_the_way(opened, here)
        return True

    def open(self, fd: int, part: str, here: str, subject: str, last: bool, back_after: bool) -> int | str | None:
        """A handle on `part` in the folder `fd`, made if missing (None in check mode); the
        target of a trusted link there, to follow; or a refusal."""
        self.made = False
        try:
            return os.open(part, FOLDER, dir_fd=fd)
        except FileNotFoundError:
            if back_after:  # the kernel would not go through a missing folder and back
                raise Refused(f"{VARIABLE} {self.given} goes through {here}, which does not exist, and back (..)") \
                    from None
            if not self.make:
                return None
        except OSError as error:
            # A link fails as ELOOP, or as ENOTDIR when it points to a file or nowhere.
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if not stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                raise Refused(f"{subject} is not a folder") from None
            return self.link(fd, part, here, subject, last)
        os.mkdir(part, 0o700 if last else 0o755, dir_fd=fd)
        child = os.open(part, FOLDER, dir_fd=fd)
        details = os.fstat(child)
        # Made here only if it is still the runner's new, empty folder: one swapped in since
        # the mkdir is judged as one found there.
        self.made = details.st_uid == os.geteuid() and not os.listdir(child)
        if self.made and not last:
            os.fchmod(child, 0o755)  # whatever the umask: the OS user goes through it
        return child

    def link(self, fd: int, part: str, here: str, subject: str, last: bool) -> str:
        target = os.readlink(part, dir_fd=fd)
        if last:
            raise Refused(f"{subject} is a link (to {target}): drydock would follow it as root; write a real folder's "
                          "path instead, or remove the link and the next run makes the folder")
        link, others = os.stat(part, dir_fd=fd, follow_symlinks=False), writers(os.fstat(fd), self.trusted)
        if link.st_uid not in self.trusted:
            why = f"a link {name_of(link.st_uid)} made"
        elif others:  # no sticky exception: another could have put a hard link to root's link there
            why = f"a link in a folder {others} can change"
        else:
            return target
        raise Refused(f"{VARIABLE} {self.given} goes through {here}, {why}: drydock would follow it as root; check "
                      f"where it points ({target}), and if that is the folder meant, write its path instead")

    def check_on_the_way(self, fd: int, here: str) -> None:
        details = os.fstat(fd)
        if not can_enter(details, self.owner, self.groups):
            raise Refused(f"{VARIABLE} {self.given}: {self.owner.pw_name} cannot enter {here} "
                          f"({name_of(details.st_uid)}'s, mode {stat.S_IMODE(details.st_mode):04o}), so its dumps "
                          f"there would fail: write a folder it can reach, or let it through (chmod o+x {here})")
        keepers = self.trusted | {self.owner.pw_uid}
        others = writers(details, keepers)
        # Sticky keeps others from each other's entries, not from the folder's owner's hands.
        if others and not (details.st_mode & stat.S_ISVTX and details.st_uid in keepers):
            raise Refused(f"{VARIABLE} {self.given} goes through {here}, which {others} can change: they could put "
                          f"a folder of their own in drydock's; write a path only root and {self.owner.pw_name} can "
                          "change")


def refusal(shown: str, path: str, owner: str, owner_uid: int, folder: os.stat_result, holds_files: bool) -> str | None:
    """Why drydock must not take this existing folder (at `path`, `shown` to the user) for its
    dumps (None when it may)."""
    mode = stat.S_IMODE(folder.st_mode)
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        return (f"{VARIABLE} {shown} is a shared folder (mode {mode:04o}): drydock would make it {owner}'s alone; "
                "write a folder of drydock's own, such as /var/backups/drydock")
    # Another user's, even empty: until it is given away, they could put a folder in it and
    # keep a handle on it inside the OS user's private one.
    if folder.st_uid not in (0, os.geteuid(), owner_uid):
        return (f"{VARIABLE} {shown} is {name_of(folder.st_uid)}'s: drydock would take it from them; write a new "
                f"folder, or one that is root's or {owner}'s")
    if folder.st_uid != owner_uid and os.path.dirname(path) == "/":
        return (f"{VARIABLE} {shown} is a folder at the top of the machine, {name_of(folder.st_uid)}'s: drydock "
                f"would make it {owner}'s alone; write a folder in it, such as {path}/drydock")
    if folder.st_uid != owner_uid and holds_files:
        return (f"{VARIABLE} {shown} is {name_of(folder.st_uid)}'s and holds files: drydock would give it to {owner}; "
                f"write a new or empty folder, such as /var/backups/drydock (or, if it is meant for the dumps, a disk "
                f"mounted there, chown {owner} it yourself)")
    return None


def make_private(walk: Walk) -> tuple[bool, str]:
    """Look at the folder, then make or take it and give it to the OS user, 0700: whether it
    changed (or would, in check mode), and where it is."""
    if not walk.to_folder():
        return True, walk.given
    fd, path = walk.stack[-1]
    folder, owner = os.fstat(fd), walk.owner
    # One this walk made is drydock's own, a new /drydock too.
    why = None if walk.made else refusal(walk.shown(path), path, owner.pw_name, owner.pw_uid, folder,
                                         holds_files=bool(os.listdir(fd)))
    if why:
        raise Refused(why)
    changed = walk.made
    try:
        if folder.st_uid != owner.pw_uid:
            changed = True
            if walk.make:
                os.fchown(fd, owner.pw_uid, -1)
        if stat.S_IMODE(folder.st_mode) != 0o700:
            changed = True
            if walk.make:
                os.fchmod(fd, 0o700)
    except OSError:
        if walk.made:  # leave no folder of the runner's behind
            os.rmdir(os.path.basename(path), dir_fd=walk.stack[-2][0])
        raise
    return changed, path


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(path=dict(type="path", required=True), owner=dict(type="str", required=True)),
        supports_check_mode=True,
    )
    # "." dropped as the kernel would: kept, the walk would take it for a folder to climb out of.
    given = "/" + "/".join(part for part in module.params["path"].split("/") if part not in ("", "."))
    if not module.params["path"].startswith("/") or os.path.basename(given) in ("", ".", "..") or "\0" in given:
        module.fail_json(msg=f"{VARIABLE} must be an absolute path that ends in a folder's name, not "
                             f"{module.params['path']!r}")
    try:
        owner = pwd.getpwnam(module.params["owner"])
    except (KeyError, ValueError):
        module.fail_json(msg=f"drydock_db_os_user {module.params['owner']!r} is not a user on this host")
    walk = Walk(given, owner, make=not module.check_mode)
    failure = None
    try:
        changed, folder = make_private(walk)
    except Refused as why:
        failure = str(why)
    except OSError as error:
        hint = ("" if os.geteuid() == 0 else
                f" (made as {name_of(os.geteuid())}, as drydock_db_become is false: make it yourself, "
                f"{owner.pw_name}'s, or set drydock_db_become: true)")
        failure = (f"cannot make {VARIABLE} {given} {owner.pw_name}'s, 0700: {error.strerror} "
                   f"(in {walk.stack[-1][1] if walk.stack else '/'}){hint}")
    finally:
        walk.close()  # before Ansible reports: the walk may hold many handles
    if failure:
        module.fail_json(msg=failure)
    module.exit_json(changed=changed, folder=folder)


if __name__ == "__main__":
    main()
