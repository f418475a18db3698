"""The modules that hand a database name to pg_dump or pg_restore refuse one that those would
read as a connection string, even when run on their own (ansible -m), without a role's
preflight. Run in check mode: they refuse before they would connect anywhere."""
import json
import subprocess
import sys

import pytest

from drydock.playbook import ansible_env

MODULES = {
    "drydock_pg_dump": {"socket_dir": "/tmp", "dest": "/tmp/drydock-unit-never.dump"},
    "drydock_pg_restore": {"socket_dir": "/tmp", "owner": "site", "archive": "/tmp/drydock-unit-never.dump",
                           "expect_row_counts": {}},
}


def run_check_mode(module: str, database: str) -> subprocess.CompletedProcess:
    args = {"database": database, "pg_bindir": "/usr/lib/postgresql/15/bin", **MODULES[module]}
    return subprocess.run(["ansible", "localhost", "-i", "localhost,", "-c", "local", "--check",
                           "-e", f"ansible_python_interpreter={sys.executable}", "-m", module, "-a", json.dumps(args)],
                          env=ansible_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", sorted(MODULES))
@pytest.mark.parametrize("database", ["host=elsewhere dbname=site", "postgresql://elsewhere/site", "Site-Name"])
def test_a_name_pg_tools_would_read_as_a_connection_string_is_refused(module, database):
    proc = run_check_mode(module, database)
    assert proc.returncode != 0 and "not a plain database name" in proc.stdout + proc.stderr


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_plain_name_passes_to_the_command(module):
    proc = run_check_mode(module, "site__incoming")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--dbname=site__incoming" in proc.stdout


@pytest.mark.parametrize("claimed_size, fetched", [
    (lambda free: 1, True), (lambda free: free + free // 10, False), (lambda free: 2**60, False),
], ids=["1 byte", "a tenth over the free space", "2**60 bytes"])
def test_the_fetch_refuses_a_dump_bigger_than_the_controllers_free_space(tmp_path, claimed_size, fetched):
    """Checked before the transfer: a fetch that fills the disk fails only at its end. Just
    over the free space is too big too, not only a size no disk has."""
    import hashlib
    import os

    disk = os.statvfs(tmp_path)  # the backups' folder is made in it
    claimed_size = claimed_size(disk.f_bavail * disk.f_frsize)
    src = tmp_path / "host" / "site-20261205T000000Z.dump.zst"
    src.parent.mkdir()
    src.write_bytes(b"a dump")
    root = tmp_path / "backups"
    args = {"src": str(src), "dest": str(root / "production" / "20261205T000000Z" / src.name),
            "sha256": hashlib.sha256(b"a dump").hexdigest(), "private_root": str(root),
            "manifest": {"dump": {"size": claimed_size}}}
    proc = subprocess.run(["ansible", "localhost", "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", "-m", "drydock_fetch", "-a", json.dumps(args)],
                          env=ansible_env(), capture_output=True, text=True, timeout=120)
    files = sorted(path.name for path in root.rglob("*") if path.is_file())
    if fetched:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert files == ["manifest.json", src.name]
    else:
        assert proc.returncode != 0
        assert "not enough disk on the controller for the dump in" in proc.stdout and "MB needed" in proc.stdout
        assert files == []
