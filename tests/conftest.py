"""Shared fixtures: the real sandbox (brought up once per test session), a way to run
drydock's commands as a user would, and database probes."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import psycopg
import pytest

import drydock_pg
from drydock.cli import command
from drydock.lock import process_start
from drydock.paths import PG_BINDIR, no_world_writable_files, project_root
from drydock.playbook import ansible_env, sandbox_inventory_only
from drydock.sandbox import Sandbox, processes

ROOT = project_root()
INV = command(ROOT)  # what ./inv runs, as ./inv runs it
no_world_writable_files()  # pytest run by hand starts the sandbox too
sandbox_inventory_only(lambda message: print(message, file=sys.stderr))  # pytest run by hand, too


def inv(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `inv ARGS` exactly as ./inv does, capturing its output."""
    proc = subprocess.run([*INV, *args],
                          env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"inv {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def interrupted_when(reached: Callable[[], bool], *args: str, stop: int = signal.SIGINT) -> str:
    """Run `inv ARGS`, press Ctrl-C once `reached()` is true; its last error line ("" for
    none). With `stop`, send that signal to drydock alone instead, as `timeout` would."""
    proc = subprocess.Popen([*INV, *args],
                            env=dict(ansible_env(), DRYDOCK_ROOT=str(ROOT)), cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not reached():
            assert proc.poll() is None and time.monotonic() < deadline, f"inv {' '.join(args)} never got there"
            time.sleep(0.1)
        if stop == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole group
        else:
            os.kill(proc.pid, stop)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never left running: it would hold the target's lock for the tests after
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, f"exit status {proc.returncode}, not 130 (stopped as by SIGINT)"
    return (stderr.strip().splitlines() or [""])[-1]


def described_inventory(folder: Path, servers: tuple[str, ...], local: str, **variables) -> Path:
    """An inventory file whose hosts have every variable drydock's commands require (as "x"),
    their own drydock_env, a local connection and `variables`: for refusals that come before
    any of those values is used."""
    from drydock.inventory import HOST_VARIABLES

    def described(name: str) -> dict:
        return {**{variable: "x" for variable in HOST_VARIABLES}, "drydock_env": name, "ansible_connection": "local",
                **variables}
    hosts = folder / "hosts.yml"
    hosts.write_text(json.dumps({"all": {"children": {  # JSON is YAML
        "drydock_servers": {"hosts": {name: described(name) for name in servers}},
        "drydock_local": {"hosts": {local: described(local)}}}}}))
    return hosts


def sandbox_inventory_with(folder: Path, vars_file: str, variables: dict) -> Path:
    """An inventory folder in `folder`: the sandbox's, and `vars_file` beside it (e.g.
    "host_vars/local.yml", "group_vars/all.yml") setting `variables`, which Ansible reads over
    the script's. Its path, for DRYDOCK_INVENTORY."""
    inventory = folder / "inventory"
    (inventory / vars_file).parent.mkdir(parents=True)
    (inventory / "hosts.py").symlink_to(ROOT / "inventories" / "sandbox" / "hosts.py")
    (inventory / vars_file).write_text(json.dumps(variables))  # JSON is YAML
    return inventory


def playbook(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run a playbook with plain ansible-playbook, as an operator would."""
    return subprocess.run(["ansible-playbook", f"playbooks/{name}", *args], env=ansible_env(), cwd=ROOT,
                          capture_output=True, text=True)


def run_module(env: str, module: str, args: str | dict, fails: bool = False) -> dict:
    """Run one of drydock's database modules on `env`'s host as its playbooks do (on the
    app's database unless `args` names another, as the clusters' OS user); its result, which
    must be a failure with `fails`. `args` is key=value text, or a dict for values that are
    lists or mappings."""
    connection = {"database": "{{ drydock_db_name }}", "socket_dir": "{{ drydock_db_socket_dir }}",
                  "port": "{{ drydock_db_port }}"}
    if isinstance(args, dict):
        args = json.dumps({**connection, **args})
    else:
        args = " ".join([*(f"{key}={value}" for key, value in connection.items()), args])
    proc = subprocess.run(
        ["ansible", env, "-m", module, "-a", args,
         "-e", "ansible_become={{ drydock_db_become }}", "-e", "ansible_become_user={{ drydock_db_os_user }}"],
        cwd=ROOT, env=dict(ansible_env(), ANSIBLE_CALLBACK_RESULT_FORMAT="json"), capture_output=True, text=True)
    assert (proc.returncode != 0) == fails, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.split("=>", 1)[1])  # "local | SUCCESS => {...}", "local | FAILED! => {...}"


def app_serves(sandbox_env: dict, env: str) -> bool:
    """True when the sandbox app on `env` answers its health check with 200."""
    try:
        with urllib.request.urlopen(f"http://{sandbox_env[env]['host']}:8000/healthz", timeout=10) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status
        return False


def assert_private(dump_path: Path) -> None:
    """A dump on the controller is production data: it and its manifest 0600, every folder
    from its own up to backups/ 0700."""
    from drydock.paths import backups_dir

    assert dump_path.is_relative_to(backups_dir()), dump_path
    paths = [dump_path, dump_path.parent / "manifest.json"]
    folder = dump_path.parent
    while folder != backups_dir().parent:
        paths.append(folder)
        folder = folder.parent
    modes = {str(path): oct(stat.S_IMODE(path.stat().st_mode)) for path in paths}
    assert modes == {path: oct(0o700 if Path(path).is_dir() else 0o600) for path in modes}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def sandbox_start() -> dict:
    """Start the sandbox (and stop it at the end) unless it was already up. Returns env.json,
    whether it started here, and seed.json: each server's posts and Site as `up` seeded them."""
    box = Sandbox(say=lambda message: None)
    started_here = not box.is_up()
    try:
        box.up()
    except BaseException:  # failed or interrupted (Ctrl-C, or `inv test` stopping its shards)
        if started_here:
            box.down(quiet=True)  # no half-built sandbox left running
        raise
    yield {"env": json.loads((box.root / "env.json").read_text()), "started_here": started_here,
           "initial": json.loads((box.root / "seed.json").read_text())}
    if started_here:
        _down_and_check(box)


@pytest.fixture(scope="session")
def sandbox_env(sandbox_start) -> dict:
    """The sandbox's env.json."""
    return sandbox_start["env"]


def _down_and_check(box: Sandbox) -> None:
    """`down` must stop exactly the processes it started: a decoy naming the same data
    directory survives, the recorded PIDs do not."""
    pids = json.loads(box.pids_file.read_text())
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(box.data_dir_of("production"))])
    try:
        box.down()
        assert decoy.poll() is None, "sandbox.down killed a process it did not start"
        for entry in pids.values():
            assert not Path(f"/proc/{entry['pid']}").exists() or not Sandbox._alive(entry["pid"], entry["marker"])
        assert not box.root.exists()
    finally:
        decoy.kill()


def database_url(sandbox_env, env: str, database: str | None = None) -> str:
    """The app role's URL for `database` on `env`'s server (default: the site's database)."""
    url = sandbox_env[env]["url"]
    return url.replace(f"/{sandbox_env[env]['database']}?", f"/{database}?") if database else url


@contextmanager
def connector(sandbox_env):
    """connect(env, database=None) -> a psycopg connection as the app role, closed afterwards."""
    opened = []

    def _connect(env: str, database: str | None = None, autocommit: bool = True):
        conn = psycopg.connect(database_url(sandbox_env, env, database), autocommit=autocommit)
        opened.append(conn)
        return conn

    try:
        yield _connect
    finally:
        for conn in opened:
            conn.close()


@pytest.fixture
def connect(sandbox_env):
    with connector(sandbox_env) as _connect:
        yield _connect


def owner_psql(server: dict, database: str = "postgres", *options: str) -> list[str]:
    """psql as the cluster's owner, over its socket (through sudo when we are root): for what
    the app role may not do (rename databases, reset statistics, lock catalogs)."""
    psql = [str(PG_BINDIR / "psql"), "-X", "-q", *options, "-h", server["socket_dir"], "-p", str(server["port"]),
            "-d", database]
    return as_cluster_owner(server, psql)


def as_cluster_owner(server: dict, argv: list[str]) -> list[str]:
    """`argv` run as `server`'s cluster's OS user: through sudo when we are root."""
    return ["sudo", "-n", "-u", server["os_user"], *argv] if os.geteuid() == 0 else argv


def owner_sql(server: dict, database: str, *statements: str) -> str:
    """Run `statements` with psql as the cluster's owner, stopping at the first error; what
    they print, unaligned."""
    return subprocess.run([*owner_psql(server, database, "-v", "ON_ERROR_STOP=1", "-At"),
                           *(arg for sql in statements for arg in ("-c", sql))],
                          check=True, capture_output=True, text=True).stdout.strip()


def process_tree(root: int) -> set[tuple[int, str]]:
    """The processes descended from `root`, each with what tells it from a later process given
    the same pid (drydock.lock.process_start)."""
    table = processes()
    tree, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _pages) in table.items():
            if ppid == parent and (start := process_start(pid)):  # else it ended meanwhile
                tree.add((pid, start))
                todo.append(pid)
    return tree


def row_counts(conn) -> dict[str, int]:
    with conn.transaction(), conn.cursor() as cur:
        return drydock_pg.row_counts(cur)


def fingerprint(conn) -> dict[str, str]:
    with conn.transaction(), conn.cursor() as cur:
        return drydock_pg.content_fingerprint(cur)


# Which database is live: a swap, an exchange or a rename gives the name another database.
LIVE_OID = "SELECT oid FROM pg_database WHERE datname = 'wagtail_site'"
# A rule the app's role could put on wagtailcore_site: the superuser's UPDATE of the Site (the
# Site switch) would copy a server file the role may not read into a table of the role's.
PLANTED_SITE_RULE = ("CREATE TABLE public.planted_loot (line text); CREATE RULE planted AS ON UPDATE TO"
                     " public.wagtailcore_site DO ALSO INSERT INTO public.planted_loot SELECT pg_read_file('/etc/hostname')")
PLANTED_SITE_RULE_REMOVED = "DROP RULE IF EXISTS planted ON public.wagtailcore_site; DROP TABLE IF EXISTS public.planted_loot"


# What a server's operator sets on its live database, not in its content: a swap must keep it.
SERVER_OWN_SETTINGS = ('REVOKE CONNECT ON DATABASE {db} FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO {role};'
                       ' ALTER DATABASE {db} CONNECTION LIMIT 77; ALTER DATABASE {db} SET search_path = "$user", public;'
                       " ALTER ROLE {role} IN DATABASE {db} SET lock_timeout = '1h'")
SERVER_OWN_SETTINGS_UNDONE = ("GRANT CONNECT ON DATABASE {db} TO PUBLIC; ALTER DATABASE {db} CONNECTION LIMIT -1;"
                              " ALTER DATABASE {db} RESET ALL; ALTER ROLE {role} IN DATABASE {db} RESET ALL;")


def database_settings(conn, name: str) -> tuple:
    """A database's grants, connection limit and settings (its own and its roles')."""
    return conn.execute(
        "SELECT datacl::text, datconnlimit, ARRAY(SELECT setrole || ':' || array_to_string(setconfig, ';')"
        " FROM pg_db_role_setting WHERE setdatabase = d.oid ORDER BY 1) FROM pg_database d WHERE datname = %s",
        (name,)).fetchone()


@contextmanager
def server_own_settings(server: dict):
    """SERVER_OWN_SETTINGS on `server`'s live database while the block runs."""
    def run(template: str, database: str) -> None:
        statements = template.format(db=f'"{database}"', role=server["app_role"])
        subprocess.run([*owner_psql(server), "-v", "ON_ERROR_STOP=1", "-c", statements], check=True)

    run(SERVER_OWN_SETTINGS, server["database"])
    try:
        yield
    finally:  # on the database a swap set aside with them too, which a rollback would bring back
        aside = f"{server['database']}__previous"
        listed = subprocess.run([*owner_psql(server), "-Atc", "SELECT datname FROM pg_database"],
                                capture_output=True, text=True, check=True).stdout.split()
        for database in (server["database"], *([aside] if aside in listed else [])):
            run(SERVER_OWN_SETTINGS_UNDONE, database)


def databases(conn) -> set[str]:
    return {name for (name,) in conn.execute("SELECT datname FROM pg_database").fetchall()}


@pytest.fixture(scope="session")
def pulled(sandbox_env):
    """The local database after one `inv pull production` (returns the latest dump)."""
    inv("pull", "production", check=True)
    from drydock import dumps

    return dumps.latest("production")


@pytest.fixture(scope="module")
def staging_at_the_local_schema(pulled):
    """Staging running a copy of the local database, whatever an earlier test module left live
    there: a push refuses a copy without migrations the target has applied, and a pipeline's
    migrated copy would hold back every push of an unmigrated one after it. Leaves a scrubbed
    dump of the local database in backups/local/."""
    inv("push", "staging", "--allow-older-schema", check=True)


@pytest.fixture(scope="session")
def testinfra_host():
    """testinfra_host(env) -> a testinfra Host reached through the sandbox inventory."""
    import testinfra

    os.environ.update(ansible_env())
    inventory = str(ROOT / "inventories" / "sandbox")
    return lambda env: testinfra.get_host(f"ansible://{env}?ansible_inventory={inventory}")
