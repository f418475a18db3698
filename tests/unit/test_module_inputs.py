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
