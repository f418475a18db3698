"""`inv sandbox.up` on addresses another program holds: one line before anything is built."""
from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from drydock.sandbox import PG_PORT, Sandbox, SandboxError, last_fatal, port_free

# Kept clear of the test shards' sandboxes (127.0.0.x, 127.0.11.x and up).
NET = "127.0.250"


@pytest.fixture
def build_root():
    """A folder the clusters' OS user may enter (up checks that first), removed after."""
    parent = Path(tempfile.mkdtemp(prefix="drydock-up-test-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent / "sandbox"
    shutil.rmtree(parent)


def test_a_port_another_program_holds_refuses_up_before_anything_is_built(build_root, monkeypatch):
    monkeypatch.setenv("DRYDOCK_SANDBOX_NET", NET)
    with socket.create_server((f"{NET}.2", PG_PORT)):  # where production's PostgreSQL would listen
        with pytest.raises(SandboxError) as refused:
            Sandbox(root=build_root, say=lambda message: None).up()
    assert str(refused.value) == (
        f"{NET}.2:{PG_PORT}, where production's PostgreSQL would listen, is taken by another program:"
        " stop it, or build the sandbox on other loopback addresses (DRYDOCK_SANDBOX_NET=127.0.N)")
    assert not build_root.exists()


def test_a_port_is_free_unless_something_listens_there():
    with socket.create_server((f"{NET}.9", 0)) as listener:
        port = listener.getsockname()[1]
        assert not port_free(f"{NET}.9", port)
        assert port_free(f"{NET}.8", port)  # the same port on another address
    assert port_free(f"{NET}.9", port)


def test_a_cluster_that_did_not_start_is_named_by_its_logs_last_fatal_line(tmp_path):
    log = tmp_path / "postgresql.log"
    log.write_text("2026-12-07 21:20:05.072 UTC [4435] FATAL:  an older failure\n"
                   "2026-12-07 21:21:05.072 UTC [4435] LOG:  could not bind IPv4 address\n"
                   "2026-12-07 21:21:05.072 UTC [4435] FATAL:  could not create any TCP/IP sockets\n"
                   "2026-12-07 21:21:05.073 UTC [4435] LOG:  database system is shut down\n")
    assert last_fatal(log) == "could not create any TCP/IP sockets"
    assert last_fatal(tmp_path / "missing.log") == ""
