"""`inv test`'s shards: every test file runs exactly once, in shards of similar length, each
sandbox on its own loopback block."""
import pytest

from drydock import testrun
from drydock.paths import project_root
from drydock.sandbox import SandboxError, environments, sandbox_net


def test_split_runs_every_file_once_in_shards_of_similar_length():
    files = testrun.test_files(project_root())
    assert "tests/integration/test_faults.py" in files and "tests/unit/test_testrun.py" in files
    shards = testrun.split(files, 2)
    assert sorted(f for shard in shards for f in shard) == sorted(files)
    seconds = [sum(testrun.FILE_SECONDS.get(f, testrun.DEFAULT_SECONDS) for f in shard) for shard in shards]
    assert max(seconds) - min(seconds) <= max(testrun.FILE_SECONDS.values()) / 4, seconds
    assert all(shard == sorted(shard) for shard in shards)  # pytest's own order inside a shard


def test_split_never_makes_an_empty_shard():
    assert testrun.split(["tests/a.py"], 3) == [["tests/a.py"]]


def test_naming_test_files_is_seen_but_options_are_not():
    root = project_root()
    assert testrun.names_paths(root, ["tests/unit/test_testrun.py::test_split_never_makes_an_empty_shard"])
    assert testrun.names_paths(root, ["-x", "tests/unit"])
    assert not testrun.names_paths(root, ["-k", "pull", "-x"])


@pytest.mark.parametrize("net", ["127.0.11", "127.255.0"])
def test_sandbox_net_is_any_loopback_block(monkeypatch, net):
    monkeypatch.setenv("DRYDOCK_SANDBOX_NET", net)
    assert sandbox_net() == net
    assert [env.address for env in environments(net)] == [f"{net}.2", f"{net}.3", f"{net}.1"]


@pytest.mark.parametrize("net", ["10.0.0", "127.0.256", "127.0", "127.0.0.1", "127.0.0; rm -rf /", ""])
def test_sandbox_net_outside_loopback_is_refused(monkeypatch, net):
    monkeypatch.setenv("DRYDOCK_SANDBOX_NET", net)
    with pytest.raises(SandboxError, match="invalid DRYDOCK_SANDBOX_NET"):
        sandbox_net()
