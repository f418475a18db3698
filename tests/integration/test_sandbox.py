"""The sandbox world: three real clusters, seeded production, older staging, reachable hosts."""
import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from drydock.sandbox import APP_PORT, CLUSTER_USER_FOLDERS, Sandbox, environments, sandbox_net, ssh_available
from tests.conftest import fingerprint, process_tree, row_counts

ENVS = ("production", "staging", "local")


def test_env_json_describes_every_environment(sandbox_env):
    assert set(sandbox_env) == set(ENVS)
    for env in ENVS:
        assert {"host", "port", "socket_dir", "database", "os_user", "url"} <= set(sandbox_env[env])
    net = sandbox_net()  # 127.0.0 unless the suite runs in shards, each on its own block
    assert [sandbox_env[e]["host"] for e in ENVS] == [f"{net}.2", f"{net}.3", f"{net}.1"]
    assert "password" not in json.dumps(sandbox_env).lower()


@pytest.mark.parametrize("env", ["production", "staging"])
def test_url_reads_every_table(connect, env):
    counts = row_counts(connect(env))
    assert len(counts) > 40 and counts["wagtailcore_page"] > 0


def test_production_is_seeded_at_the_pre_podcast_migration(connect, sandbox_start):
    conn = connect("production")
    assert sandbox_start["initial"]["production"]["posts"] >= 200
    assert conn.execute("SELECT count(*) FROM wagtailcore_revision").fetchone()[0] > 200
    assert conn.execute("SELECT count(*) FROM taggit_tag").fetchone()[0] > 0
    assert conn.execute("SELECT count(*) FROM auth_user").fetchone()[0] >= 4
    assert conn.execute("SELECT hostname, port FROM wagtailcore_site WHERE is_default_site").fetchone() == (
        "www.drydock-example.org", 443)
    applied = {name for (name,) in conn.execute("SELECT name FROM django_migrations WHERE app = 'blog'")}
    assert applied == {"0001_initial"}
    assert conn.execute("SELECT to_regclass('blog_podcast')").fetchone()[0] is None


def test_staging_holds_an_older_copy(sandbox_start):
    initial = sandbox_start["initial"]  # as seeded: later tests push to staging
    assert 0 < initial["staging"]["posts"] < initial["production"]["posts"]
    assert initial["staging"]["site"] == "staging.drydock-example.org"


def test_app_database_is_owned_by_the_app_role(connect):
    owner = connect("production").execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()").fetchone()[0]
    assert owner == "wagtail_site"


def test_what_runs_as_us_is_out_of_the_cluster_users_reach(sandbox_env):
    """The app's service script and pidfile and sshd's config run as us (root in CI): their
    folder is ours, or the clusters' OS user could swap them and be root. That user owns
    only its data, socket, log and backup folders."""
    box = Sandbox(say=lambda message: None)
    for env in box.environments:
        host = box.host_dir(env)
        assert (host.stat().st_uid, host.stat().st_mode & 0o022) == (os.getuid(), 0), host
        for name in ("app-service", "app.pid", "sshd_config"):
            if (host / name).exists():  # no app nor sshd on local
                assert (host / name).stat().st_uid == os.getuid(), host / name
        owned = {path.name for path in host.iterdir() if path.stat().st_uid != os.getuid()}
        assert owned <= set(CLUSTER_USER_FOLDERS), (host, owned)


def test_up_twice_is_harmless(sandbox_env, connect):
    box = Sandbox(say=lambda message: None)
    pids_before = box.pids_file.read_text()
    before = fingerprint(connect("production"))
    seed = json.loads((box.root / "seed.json").read_text())
    box.up()
    box.up(posts=seed.get("posts_asked"), bulk_posts=seed["bulk_posts"])  # what it was built with, asked for again
    assert box.pids_file.read_text() == pids_before
    assert fingerprint(connect("production")) == before


@pytest.mark.parametrize("option", [["--posts", "5"], ["--scale", "bench"]])
def test_up_refuses_a_size_the_running_sandbox_was_not_built_with(sandbox_env, connect, option):
    """Not a silent no-op: a user asking for a 1 GB production must not bench a 16 MB one."""
    from tests.conftest import error_lines, inv

    box = Sandbox()
    seed = json.loads((box.root / "seed.json").read_text())
    built = f"{seed['posts_asked']} posts and {seed['bulk_posts']} in bulk"  # 220 and 0 unless built by hand
    before = fingerprint(connect("production"))
    proc = inv("sandbox.up", *option)
    assert proc.returncode == 1
    assert error_lines(proc) == [f"drydock: error: the sandbox in {box.root} is built with {built}: "
                                 "--posts and --scale apply when it is built; ./inv sandbox.down first"]
    assert fingerprint(connect("production")) == before


@pytest.mark.parametrize("env", ["production", "staging"])
def test_commands_run_on_the_host_they_name(testinfra_host, sandbox_env, env):
    address = next(e.address for e in environments(sandbox_net()) if e.name == env)
    host = testinfra_host(env)
    if ssh_available():
        # Over SSH, the server side of the connection is the host's own loopback address.
        assert host.run("echo $SSH_CONNECTION").stdout.split()[2] == address
    data = host.file(sandbox_env[env]["socket_dir"])
    assert data.is_directory
    assert host.socket(f"tcp://{address}:{sandbox_env[env]['port']}").is_listening


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets `pid` and its descendants hold open."""
    inodes = set()
    for proc in [pid, *(descendant for descendant, _start in process_tree(pid))]:
        for fd in Path(f"/proc/{proc}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


@pytest.mark.parametrize("env", ["production", "staging"])
def test_the_app_listens_on_its_hosts_address_and_nowhere_else(sandbox_env, env):
    """Only the host's loopback address and port: no socket of its own in the user's home,
    such as gunicorn's control socket, which every gunicorn there would share."""
    box = Sandbox(say=lambda message: None)
    environment = next(e for e in box.environments if e.name == env)
    time.sleep(1)  # gunicorn opens its control socket in a thread, after the workers are forked
    inodes = _socket_inodes(int(box.app_pidfile(environment).read_text().split()[0]))
    unix_paths = [fields[7] for fields in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
                  if len(fields) > 7 and fields[6] in inodes]
    assert unix_paths == []
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                if table == "tcp":  # the address's four bytes as the kernel holds them, in hex
                    address = socket.inet_ntoa(struct.pack("=I", int(address, 16)))
                listening.add((address, int(port, 16)))
    assert listening == {(environment.address, APP_PORT)}
