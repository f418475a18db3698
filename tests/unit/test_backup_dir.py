"""library/drydock_backup_dir.py, run as the roles run it (ansible -m, as this machine's user)
on folders of the test's own: what it takes and makes the OS user's, 0700, and what it
refuses. The refusals of a shared folder, another user's and a link, through `inv backup`,
are in tests/integration/test_backup.py."""
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from drydock.playbook import ansible_env
from drydock.sandbox import os_user

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="another user than the OS user is needed: run as root, as CI does")


@pytest.fixture
def base():
    """A folder the OS user may pass through (pytest's tmp_path is root's alone, which the
    module refuses before anything else)."""
    folder = Path(tempfile.mkdtemp(prefix="drydock-backup-dir-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def make_private(path, fails: bool = False, check: bool = False) -> dict:
    """The module's result for `path`, made the clusters' OS user's; a failure with `fails`."""
    proc = subprocess.run(["ansible", "localhost", "-i", "localhost,", "-c", "local", *(["--check"] if check else []),
                           "-e", f"ansible_python_interpreter={sys.executable}", "-m", "drydock_backup_dir",
                           "-a", json.dumps({"path": str(path), "owner": os_user()})],
                          env=dict(ansible_env(), ANSIBLE_CALLBACK_RESULT_FORMAT="json"),
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode != 0) == fails, proc.stdout + proc.stderr
    return json.loads(proc.stdout.split("=>", 1)[1])


def owner_and_mode(path) -> tuple[str, int]:
    details = os.lstat(path)
    return pwd.getpwuid(details.st_uid).pw_name, stat.S_IMODE(details.st_mode)


def test_a_missing_folder_is_made_with_its_parents_whatever_the_umask(base):
    """Parents made 0750 under a hardened umask would keep the OS user out of its own folder."""
    folder = base / "var" / "backups" / "drydock"
    old = os.umask(0o027)  # the module inherits it, as it would through sudo
    try:
        assert make_private(folder).get("changed") is True
    finally:
        os.umask(old)
    assert owner_and_mode(folder) == (os_user(), 0o700)
    runner = pwd.getpwuid(os.geteuid()).pw_name
    assert owner_and_mode(base / "var") == owner_and_mode(base / "var" / "backups") == (runner, 0o755)


def test_an_empty_folder_and_the_os_users_own_are_made_private(base):
    """An empty folder the operator made for drydock is taken; one already the OS user's keeps its dumps."""
    folder = base / "drydock"
    folder.mkdir()
    folder.chmod(0o775)
    assert make_private(folder).get("changed") is True
    assert owner_and_mode(folder) == (os_user(), 0o700)
    (folder / "production-20261207T000000Z.dump.zst").touch()
    folder.chmod(0o750)
    assert make_private(f"{base}/drydock/../drydock/").get("folder") == str(folder)  # as the example inventory writes it
    assert owner_and_mode(folder) == (os_user(), 0o700)
    assert os.listdir(folder) == ["production-20261207T000000Z.dump.zst"]


def test_check_mode_looks_and_changes_nothing(base):
    (base / "taken").mkdir(mode=0o755)
    assert make_private(base / "taken", check=True).get("changed") is True
    assert make_private(base / "new" / "drydock", check=True).get("changed") is True
    assert sorted(os.listdir(base)) == ["taken"] and owner_and_mode(base / "taken")[1] == 0o755
    (base / "shared").mkdir()
    (base / "shared").chmod(0o1777)
    assert "is a shared folder (mode 1777)" in make_private(base / "shared", fails=True, check=True)["msg"]


@AS_ROOT
def test_a_link_on_the_way_the_os_user_could_have_made_is_never_followed(base):
    """With the folder under one of the OS user's (its home, say), that user could point a part
    of the path anywhere, and root would make or take the folder there for it."""
    home, system = base / "home", base / "system"
    home.mkdir(mode=0o755)
    system.mkdir(mode=0o755)
    os.chown(home, pwd.getpwnam(os_user()).pw_uid, -1)
    (home / "backups").symlink_to(system)
    os.lchown(home / "backups", pwd.getpwnam(os_user()).pw_uid, -1)  # as that user would have made it
    result = make_private(home / "backups" / "drydock", fails=True)
    assert result["msg"] == (f"drydock_host_backup_dir {home}/backups/drydock goes through {home}/backups, a link "
                             f"{os_user()} made: drydock would follow it as root; check where it points ({system}), "
                             "and if that is the folder meant, write its path instead")
    assert os.listdir(system) == []


def test_a_link_on_the_way_others_could_replace_is_never_followed(base):
    """Even one root made: in a folder every user can write to, another could have put theirs."""
    (base / "disk").mkdir(mode=0o755)
    (base / "shared").mkdir()
    (base / "shared").chmod(0o1777)
    (base / "shared" / "backups").symlink_to(base / "disk")
    assert f"goes through {base}/shared/backups, a link in a folder every user can change" in make_private(
        base / "shared" / "backups" / "drydock", fails=True)["msg"]
    assert os.listdir(base / "disk") == []


def test_a_folder_on_the_way_others_can_change_is_refused(base):
    """They could rename drydock's folder away and put one of their own, with dumps, in its place."""
    (base / "public").mkdir()
    (base / "public").chmod(0o777)
    assert make_private(base / "public" / "drydock", fails=True)["msg"] == (
        f"drydock_host_backup_dir {base}/public/drydock goes through {base}/public, which every user can change: they "
        f"could put a folder of their own in drydock's; write a path only root and {os_user()} can change")
    assert os.listdir(base / "public") == []


@AS_ROOT
def test_a_link_on_the_way_only_root_can_change_is_followed(base):
    """/var/backups may be a link an administrator made to a bigger disk."""
    (base / "disk").mkdir(mode=0o755)
    (base / "backups").symlink_to(base / "disk")
    assert make_private(base / "backups" / "drydock").get("folder") == str(base / "disk" / "drydock")
    assert owner_and_mode(base / "disk" / "drydock") == (os_user(), 0o700)


@AS_ROOT
def test_a_folder_on_the_way_the_os_user_cannot_enter_is_refused(base):
    (base / "closed").mkdir(mode=0o700)
    result = make_private(base / "closed" / "drydock", fails=True)
    assert result["msg"] == (f"drydock_host_backup_dir {base}/closed/drydock: {os_user()} cannot enter {base}/closed "
                             f"(root's, mode 0700), so its dumps there would fail: write a folder it can reach, or let "
                             f"it through (chmod o+x {base}/closed)")
    assert os.listdir(base / "closed") == []


@pytest.mark.parametrize("given, message", [
    ("relative/drydock", "drydock_host_backup_dir must be an absolute path that ends in a folder's name, not "
                         "'relative/drydock'"),
    ("{base}/..", "drydock_host_backup_dir must be an absolute path that ends in a folder's name"),
    ("{base}/a-file", "drydock_host_backup_dir {base}/a-file is not a folder"),
    ("{base}/a-file/drydock", "drydock_host_backup_dir {base}/a-file/drydock goes through {base}/a-file, which is "
                              "not a folder"),
    ("{base}/nowhere", "drydock_host_backup_dir {base}/nowhere is a link (to /nonexistent/drydock): drydock would "
                       "follow it as root"),
    ("{base}/missing/../drydock", "drydock_host_backup_dir {base}/missing/../drydock goes through {base}/missing, "
                                  "which does not exist, and back (..)"),
])
def test_what_is_no_folder_is_refused(base, given, message):
    (base / "a-file").write_text("kept")
    (base / "nowhere").symlink_to("/nonexistent/drydock")
    result = make_private(given.format(base=base), fails=True)
    assert message.format(base=base) in result["msg"], result
    assert (base / "a-file").read_text() == "kept" and sorted(os.listdir(base)) == ["a-file", "nowhere"]


def test_a_folder_at_the_top_of_the_machine_is_refused():
    """An inventory that says /srv (empty on many machines) would make it the OS user's alone.
    The rule is tested on a folder of the test's own: the module is never pointed at /srv."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "library"))
    try:
        from drydock_backup_dir import refusal
    finally:
        sys.path.pop(0)
    with tempfile.TemporaryDirectory() as folder:
        details = os.stat(folder)
    assert refusal("/srv", "/srv", "postgres", details.st_uid + 1, details, holds_files=False) == (
        f"drydock_host_backup_dir /srv is a folder at the top of the machine, {pwd.getpwuid(details.st_uid).pw_name}'s: "
        "drydock would make it postgres's alone; write a folder in it, such as /srv/drydock")
    assert refusal("/srv/drydock", "/srv/drydock", "postgres", details.st_uid + 1, details, holds_files=False) is None


@AS_ROOT
def test_another_users_folder_is_never_taken_nor_gone_through_even_sticky(base):
    """Its owner could take drydock's folder out of it, or, before it is given away, put a
    folder of their own in it and keep a handle on it inside the OS user's private one."""
    nobody = pwd.getpwnam("nobody").pw_uid
    for name in ("theirs", "their-sticky"):
        (base / name).mkdir(mode=0o755)
        os.chown(base / name, nobody, -1)
    (base / "their-sticky").chmod(0o1777)
    assert make_private(base / "theirs", fails=True)["msg"] == (
        f"drydock_host_backup_dir {base}/theirs is nobody's: drydock would take it from them; write a new folder, or one "
        f"that is root's or {os_user()}'s")
    assert f"goes through {base}/their-sticky, which nobody can change" in make_private(
        base / "their-sticky" / "drydock", fails=True)["msg"]
    assert owner_and_mode(base / "theirs") == ("nobody", 0o755) and os.listdir(base / "their-sticky") == []


def test_a_dot_is_read_as_the_kernel_reads_it(base):
    """Kept as a part, "a/./../b" would have made a/b while the dumps went to b."""
    (base / "a").mkdir(mode=0o755)
    assert make_private(f"{base}/a/./../b").get("folder") == str(base / "b")
    assert owner_and_mode(base / "b") == (os_user(), 0o700) and os.listdir(base / "a") == []
