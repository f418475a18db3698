"""library/drydock_backup_dir.py, run as the roles run it (ansible -m, as this machine's user)
on folders of the test's own: what it takes and makes the OS user's, 0700, and what it
refuses. The refusals of a shared folder, another user's and a link, through `inv backup`,
are in tests/integration/test_backup.py."""
import json
import os
import pwd
import stat
import subprocess
import sys

import pytest

from drydock.playbook import ansible_env
from drydock.sandbox import os_user


def make_private(path, fails: bool = False) -> dict:
    """The module's result for `path`, made the clusters' OS user's; a failure with `fails`."""
    proc = subprocess.run(["ansible", "localhost", "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", "-m", "drydock_backup_dir",
                           "-a", json.dumps({"path": str(path), "owner": os_user()})],
                          env=dict(ansible_env(), ANSIBLE_CALLBACK_RESULT_FORMAT="json"),
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode != 0) == fails, proc.stdout + proc.stderr
    return json.loads(proc.stdout.split("=>", 1)[1])


def owner_and_mode(path) -> tuple[str, int]:
    details = os.lstat(path)
    return pwd.getpwuid(details.st_uid).pw_name, stat.S_IMODE(details.st_mode)


def test_a_missing_folder_is_made_with_its_parents(tmp_path):
    result = make_private(tmp_path / "var" / "backups" / "drydock")
    assert result.get("changed") is True, result
    assert owner_and_mode(tmp_path / "var" / "backups" / "drydock") == (os_user(), 0o700)
    assert owner_and_mode(tmp_path / "var")[0] == pwd.getpwuid(os.geteuid()).pw_name  # the parents stay the runner's


def test_an_empty_folder_and_the_os_users_own_are_made_private(tmp_path):
    """An empty folder the operator made for drydock is taken; one already the OS user's keeps its dumps."""
    folder = tmp_path / "drydock"
    folder.mkdir()
    folder.chmod(0o775)
    assert make_private(folder).get("changed") is True
    assert owner_and_mode(folder) == (os_user(), 0o700)
    (folder / "production-20261207T000000Z.dump.zst").touch()
    folder.chmod(0o750)
    assert make_private(f"{tmp_path}/elsewhere/../drydock/").get("path") == str(folder)  # as the example inventory writes it
    assert owner_and_mode(folder) == (os_user(), 0o700)
    assert os.listdir(folder) == ["production-20261207T000000Z.dump.zst"]


@pytest.mark.parametrize("given, message", [
    ("relative/drydock", "drydock_host_backup_dir must be an absolute path that ends in a folder's name, not "
                         "'relative/drydock'"),
    ("{tmp}/..", "drydock_host_backup_dir must be an absolute path that ends in a folder's name"),
    ("{tmp}/a-file", "drydock_host_backup_dir {tmp}/a-file is not a folder"),
])
def test_what_is_no_folder_is_refused(tmp_path, given, message):
    (tmp_path / "a-file").write_text("kept")
    result = make_private(given.format(tmp=tmp_path), fails=True)
    assert message.format(tmp=tmp_path) in result["msg"], result
    assert (tmp_path / "a-file").read_text() == "kept"
