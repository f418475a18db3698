"""The sandbox: production, staging and local as real PostgreSQL clusters on loopback.

Everything lives under `.sandbox/`. Every process started here is recorded in
`.sandbox/pids.json` and `down()` stops exactly those PIDs, nothing else.

As root, clusters run as the `postgres` OS user (PostgreSQL refuses root); as a normal
user they run as that user. Production and staging are reached over SSH when sshd is
installed (one sshd per host on its own loopback address), else by a local connection.
"""
from __future__ import annotations

import errno
import getpass
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from drydock.lock import stat_fields
from drydock.paths import PG_BINDIR, example_site_dir, sandbox_dir

DATABASE = "wagtail_site"
APP_ROLE = "wagtail_site"
PG_PORT = 55432  # not 5432: many developers run their own PostgreSQL there
SSH_PORT = 2222
APP_PORT = 8000
SSHD = Path("/usr/sbin/sshd")
# What the clusters' OS user owns in a host's folder (data, socket, log, backups); the rest is ours.
CLUSTER_USER_FOLDERS = ("data", "run", "log", "backups")
# The migration production runs at: before the Podcast model exists.
PRODUCTION_BLOG_MIGRATION = "0001_initial"
DEFAULT_POSTS = 220  # posts Wagtail creates in production when `up` builds the sandbox
POSTS_ADDED_AFTER_STAGING_COPY = 5
# Sizes for --scale, in MB of 10^6 bytes as pg_database_size counts them, measured here:
# the default seed is ~15.7 MB; each bulk-added post (14 paragraphs, a revision, two tags,
# six log entries) adds ~18,560 bytes on disk (58,373 of them made 1.099 GB).
SMALL_MB = 15.7
BULK_POST_BYTES = 18_560
BULK_PARAGRAPHS = 14
SCALES_MB = {"small": SMALL_MB, "bench": 1000}


@dataclass(frozen=True)
class Environment:
    name: str
    address: str
    site_hostname: str
    site_port: int
    server: bool  # reached like a remote server (production, staging), not the local machine


# The sandbox's hosts live on 127.0.0.x unless DRYDOCK_SANDBOX_NET names another block of
# the loopback network (127.A.B): so that two sandboxes, e.g. two test shards, run side by side.
DEFAULT_NET = "127.0.0"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"


def checked_net(net: str, source: str = "DRYDOCK_SANDBOX_NET") -> str:
    """`net` if it is the first three octets of a loopback address: it goes into config files."""
    if not re.fullmatch(rf"127\.{_OCTET}\.{_OCTET}", net):
        raise SandboxError(f"invalid {source} {net!r}: use the first three octets of a "
                           "loopback address, e.g. 127.0.10")
    return net


def sandbox_net() -> str:
    return checked_net(os.environ.get("DRYDOCK_SANDBOX_NET", DEFAULT_NET))


def environments(net: str = DEFAULT_NET) -> tuple[Environment, ...]:
    """production, staging and local, each on its own address of `net` (local on .1)."""
    return (
        Environment("production", f"{net}.2", "www.drydock-example.org", 443, True),
        Environment("staging", f"{net}.3", "staging.drydock-example.org", 443, True),
        Environment("local", f"{net}.1", "localhost", 8000, False),
    )

Say = Callable[[str], None]


def port_free(address: str, port: int) -> bool:
    """No other socket listens on address:port (nor on the port of every address), as a
    server binding it would find: with SO_REUSEADDR, as PostgreSQL, sshd and gunicorn bind."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            return error.errno != errno.EADDRINUSE  # anything else is the server's to report
    return True


def last_fatal(log: Path) -> str:
    """The last FATAL line of a PostgreSQL log, with its message only."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    fatal = [line.split("FATAL:", 1)[1].strip() for line in lines if "FATAL:" in line]
    return fatal[-1] if fatal else ""


class SandboxError(RuntimeError):
    """The sandbox could not be built or stopped; the message is one line."""


def bulk_posts_for(scale: str | int) -> int:
    """How many posts to add in bulk so production is about `scale` ('small', 'bench' or MB)."""
    text = str(scale)
    if text in SCALES_MB:
        megabytes = SCALES_MB[text]
    elif text.isdigit() and int(text) > 0:
        megabytes = int(text)
    else:
        raise SandboxError(f"invalid --scale {text!r}: use small, bench or a size in MB")
    return max(0, int((megabytes - SMALL_MB) * 1e6 / BULK_POST_BYTES))


def os_user() -> str:
    """The OS user the clusters run as."""
    return "postgres" if os.geteuid() == 0 else getpass.getuser()


def ssh_available() -> bool:
    """sshd is installed, wanted, and can start: as a normal user it needs its
    privilege-separation folder to exist already (only root can create /run/sshd)."""
    if not SSHD.exists() or os.environ.get("DRYDOCK_SANDBOX_SSH", "1") == "0":
        return False
    return os.geteuid() == 0 or Path("/run/sshd").is_dir()


def _run(cmd: list[str], *, as_db_user: bool = False, input: str | None = None,
         env: dict | None = None, cwd: Path | None = None) -> str:
    """Run a command (as the clusters' OS user when asked); raise with its stderr's last line."""
    kwargs: dict = {}
    if as_db_user and os.geteuid() == 0:
        kwargs.update(user="postgres", group="postgres", extra_groups=[])
    proc = subprocess.run(cmd, input=input, env=env, cwd=cwd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SandboxError(f"{Path(cmd[0]).name} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, resident pages), from /proc/<pid>/stat."""
    table = {}
    for folder in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(folder.name)
        if fields:  # else it ended meanwhile
            table[int(folder.name)] = (int(fields[1]), int(fields[21]))
    return table


def child_pids(pid: int) -> list[int]:
    """PIDs whose parent is `pid`."""
    return [child for child, (parent, _pages) in processes().items() if parent == pid]


def _stop(pid: int, sig: int, marker: str = "", timeout: float = 30, children: bool = False) -> bool:
    """Send `sig` to `pid` and wait until it is gone (or a zombie); True when it stopped.
    With `children`, its child processes are stopped first (SIGTERM): they would outlive it."""
    if children:
        for child in child_pids(pid):
            _stop(child, signal.SIGTERM)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Sandbox._alive(pid, marker):
            return True
        time.sleep(0.1)
    return False


class Sandbox:
    def __init__(self, root: Path | None = None, say: Say = print):
        self.root = root or sandbox_dir()
        self.say = say
        self.user = os_user()
        # A sandbox that is built keeps the addresses it was built on (see up()).
        self.net = self._recorded_net() or sandbox_net()
        self.environments = environments(self.net)

    def _recorded_net(self) -> str | None:
        """The net of a sandbox that is already built, from its env.json."""
        try:
            host = json.loads((self.root / "env.json").read_text())["local"]["host"]
        except (OSError, ValueError, KeyError):
            return None
        return checked_net(host.rsplit(".", 1)[0], source=f"address in {self.root / 'env.json'}")

    # -- layout -------------------------------------------------------------------------
    def host_dir(self, env: Environment) -> Path:
        return self.root / env.name

    def data_dir(self, env: Environment) -> Path:
        return self.host_dir(env) / "data"

    def data_dir_of(self, name: str) -> Path:
        return self.data_dir(next(env for env in self.environments if env.name == name))

    def socket_dir(self, env: Environment) -> Path:
        return self.host_dir(env) / "run"

    @property
    def pgpass(self) -> Path:
        return self.root / "pgpass"

    @property
    def pids_file(self) -> Path:
        return self.root / "pids.json"

    def url(self, env: Environment) -> str:
        # The password stays in the passfile: never in the URL, the environment or `ps`.
        return f"postgresql://{APP_ROLE}@{env.address}:{PG_PORT}/{DATABASE}?passfile={self.pgpass}"

    # -- pids ---------------------------------------------------------------------------
    def _pids(self) -> dict[str, dict]:
        return json.loads(self.pids_file.read_text()) if self.pids_file.exists() else {}

    def _record_pid(self, key: str, pid: int, marker: str) -> None:
        pids = self._pids()
        pids[key] = {"pid": pid, "marker": marker}
        self.pids_file.write_text(json.dumps(pids, indent=2))

    def _running(self, key: str) -> bool:
        """The process recorded under `key` (e.g. postgres-local) runs, and is the one we started."""
        entry = self._pids().get(key)
        return bool(entry) and self._alive(entry["pid"], entry["marker"])

    @staticmethod
    def _alive(pid: int, marker: str) -> bool:
        """True if `pid` runs and is the process we started (its command line names `marker`).
        A zombie has an empty command line: it has stopped."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return False
        return bool(cmdline) and bool(marker) and marker in cmdline  # an empty marker names no process

    # -- up -----------------------------------------------------------------------------
    def up(self, posts: int | None = None, paragraphs: int = 4, bulk_posts: int | None = None) -> None:
        """Build the sandbox, or start what of it is not running. `posts` and `bulk_posts` (None:
        220 and 0) seed a new one; a built one refuses other values rather than ignore them."""
        if os.geteuid() == 0:
            self._check_postgres_can_reach_project()
        wanted = sandbox_net()
        if self.net != wanted:  # self.net is the built sandbox's own block
            raise SandboxError(f"the sandbox in {self.root} is built on {self.net}.x, not {wanted}.x: "
                               "run `inv sandbox.down` first")
        fresh = not (self.root / "env.json").exists()
        if not fresh:
            self._refuse_another_seed(posts, bulk_posts)
        self._refuse_taken_addresses()
        if fresh and self.root.exists():
            # A half-built sandbox from an interrupted `up`: start over.
            self.down(quiet=True)
        self.root.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.root, 0o711)  # the clusters' user must traverse it, nobody may list it
        if fresh:
            self._write_pgpass()
        for env in self.environments:
            self._start_cluster(env, fresh)
        if ssh_available():
            self._start_sshd_all()
        if fresh:
            self._seed(DEFAULT_POSTS if posts is None else posts, paragraphs, bulk_posts or 0)
        for env in self.environments:
            if env.server:
                self._start_app(env)
        self._write_env_files()
        self.say(f"sandbox is up ({'ssh' if ssh_available() else 'local'} connections): {self.root}/env.json")

    def _refuse_another_seed(self, posts: int | None, bulk_posts: int | None) -> None:
        """Asked for a size the built sandbox was not seeded with: say so, not seem to comply."""
        try:
            seed = json.loads((self.root / "seed.json").read_text())
        except (OSError, ValueError):
            return  # built before seed.json was written: nothing to compare with
        built = (seed.get("posts_asked"), seed.get("bulk_posts", 0))  # posts_asked: not recorded before 2026-12-05
        for asked, had in zip((posts, bulk_posts), built):
            if asked is not None and had is not None and asked != had:
                posts_part = f"{built[0]} posts and " if built[0] is not None else ""
                raise SandboxError(f"the sandbox in {self.root} is built with {posts_part}{built[1]} in bulk: "
                                   "--posts and --scale apply when it is built; ./inv sandbox.down first")

    def _refuse_taken_addresses(self) -> None:
        """Before anything starts: a port another program holds would fail its server halfway
        through the build (PostgreSQL's only in its log), leaving the servers before it running."""
        for env in self.environments:
            wanted = [] if self._running(f"postgres-{env.name}") else [("PostgreSQL", PG_PORT)]
            if env.server and ssh_available() and not self._running(f"sshd-{env.name}"):
                wanted.append(("sshd", SSH_PORT))
            if env.server and self._app_pid(env) is None:
                wanted.append(("app", APP_PORT))
            for what, port in wanted:
                if not port_free(env.address, port):
                    raise SandboxError(
                        f"{env.address}:{port}, where {env.name}'s {what} would listen, is taken by another program:"
                        " stop it, or build the sandbox on other loopback addresses (DRYDOCK_SANDBOX_NET=127.0.N)")

    def _check_postgres_can_reach_project(self) -> None:
        probe = subprocess.run(["test", "-x", str(self.root.parent)], user="postgres", group="postgres", extra_groups=[])
        if probe.returncode != 0:
            raise SandboxError(
                f"the postgres user cannot enter {self.root.parent}: clone drydock under a directory "
                "that others may traverse (e.g. /srv or /work), not under /root")

    def _write_pgpass(self) -> None:
        password = secrets.token_urlsafe(24)
        lines = [f"{env.address}:{PG_PORT}:*:{APP_ROLE}:{password}" for env in self.environments]
        fd = os.open(self.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def _app_password(self) -> str:
        return self.pgpass.read_text().splitlines()[0].rsplit(":", 1)[1]

    def _start_cluster(self, env: Environment, fresh: bool) -> None:
        data = self.data_dir(env)
        host = self.host_dir(env)
        # The host's folder is ours, not the cluster's OS user's: it holds the app's service
        # script and pidfile and sshd's config, which run as us (root here), and a user who
        # owns a folder can swap any file in it. That user gets only its own folders below.
        # Also for a sandbox made before this was so, running or not: what that user may have
        # put there (a link, or a file in place of ours) goes first, and is written anew.
        host.mkdir(mode=0o711, parents=True, exist_ok=True)
        if host.stat().st_uid != os.getuid():
            for entry in host.iterdir():
                if entry.name in CLUSTER_USER_FOLDERS or entry.lstat().st_uid == os.getuid():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        os.chown(host, os.getuid(), os.getgid())
        os.chmod(host, 0o711)
        if self._running(f"postgres-{env.name}"):
            return
        if fresh:
            self.say(f"  {env.name}: initdb on {env.address}:{PG_PORT}")
            for folder, mode in ((data, 0o700), (self.socket_dir(env), 0o755), (host / "log", 0o700),
                                 (host / "backups", 0o700)):
                folder.mkdir(mode=mode, parents=True, exist_ok=True)
                os.chmod(folder, mode)
                shutil.chown(folder, self.user, self._group())
            _run([str(PG_BINDIR / "initdb"), "-D", str(data), "-U", self.user, "-E", "UTF8",
                  "--locale=C.UTF-8", "--auth-local=peer", "--auth-host=scram-sha-256"], as_db_user=True)
            with open(data / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# drydock sandbox\n"
                    f"listen_addresses = '{env.address}'\nport = {PG_PORT}\n"
                    f"unix_socket_directories = '{self.socket_dir(env)}'\n"
                    "max_connections = 50\nshared_buffers = 128MB\n"
                    # A disposable sandbox: durability is not worth the test time.
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                )
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write("host all all 127.0.0.0/8 scram-sha-256\n")
        else:  # stopped by hand, or by a test of a stopped server: say so, not start it unseen
            self.say(f"  {env.name}: starting its cluster, which was not running")
        log = host / "log" / "postgresql.log"
        try:
            _run([str(PG_BINDIR / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"], as_db_user=True)
        except SandboxError:  # pg_ctl says only "Examine the log output."
            raise SandboxError(f"{env.name}'s PostgreSQL did not start: {last_fatal(log) or 'no FATAL line'} (see {log};"
                               " the next sandbox.up, or sandbox.down, stops the servers this one started)") from None
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        self._record_pid(f"postgres-{env.name}", pid, str(data))
        if fresh:
            password = self._app_password()
            self._psql(env, "postgres",
                       f"CREATE ROLE {APP_ROLE} LOGIN CREATEDB PASSWORD '{password}';\n"
                       f"CREATE DATABASE {DATABASE} OWNER {APP_ROLE};\n")

    def _group(self) -> str | int:
        return "postgres" if os.geteuid() == 0 else os.getgid()

    def _psql(self, env: Environment, database: str, sql: str) -> str:
        # SQL on stdin, not on the command line: it may hold a password.
        return _run([str(PG_BINDIR / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir(env)),
                     "-p", str(PG_PORT), "-d", database, "-At"], as_db_user=True, input=sql)

    def blog_kind(self, name: str) -> str:
        """The model of environment `name`'s blog page: blog as built, podcast once the demo's
        notebook has run on that database."""
        env = next(env for env in self.environments if env.name == name)
        return self._psql(env, DATABASE, "SELECT ct.model FROM wagtailcore_page p JOIN django_content_type ct"
                                         " ON ct.id = p.content_type_id WHERE p.slug = 'blog'").strip()

    # -- ssh ----------------------------------------------------------------------------
    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    def _start_sshd_all(self) -> None:
        ssh = self.ssh_dir
        if not (ssh / "id_ed25519").exists():
            ssh.mkdir(mode=0o700, exist_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "drydock-sandbox", "-f", str(ssh / "id_ed25519")])
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "drydock-sandbox-host", "-f", str(ssh / "host_ed25519")])
            shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
            host_key = (ssh / "host_ed25519.pub").read_text().split()[:2]
            known = [f"[{env.address}]:{SSH_PORT} {' '.join(host_key)}" for env in self.environments if env.server]
            (ssh / "known_hosts").write_text("\n".join(known) + "\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        for env in self.environments:
            if env.server:
                self._start_sshd(env)

    def _start_sshd(self, env: Environment) -> None:
        key = f"sshd-{env.name}"
        if self._running(key):
            return
        config = self.host_dir(env) / "sshd_config"
        config.write_text(
            f"ListenAddress {env.address}:{SSH_PORT}\n"
            f"HostKey {self.ssh_dir / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\n"
            f"PidFile {self.host_dir(env) / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            f"AllowUsers {getpass.getuser()}\n"
            "AcceptEnv LANG LC_*\n"
            # Bash reads ~/.bashrc for a command that comes over SSH, unless it runs inside
            # another shell (SHLVL set). The controller's user may have an interactive setup
            # there (on this machine root's pyenv init: 0.25 s), which every Ansible task
            # would pay; a server's deploy user has none.
            "SetEnv SHLVL=1\n"
            "Subsystem sftp internal-sftp\n"
        )
        proc = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(self.host_dir(env) / "sshd.log")],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._record_pid(key, proc.pid, str(config))
        for _ in range(50):
            if proc.poll() is not None:
                raise SandboxError(f"sshd for {env.name} exited: see {self.host_dir(env) / 'sshd.log'}")
            try:
                with socket.create_connection((env.address, SSH_PORT), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise SandboxError(f"sshd for {env.name} did not listen on {env.address}:{SSH_PORT}")

    # -- the app service ----------------------------------------------------------------
    def app_script(self, env: Environment) -> Path:
        return self.host_dir(env) / "app-service"

    def app_pidfile(self, env: Environment) -> Path:
        return self.host_dir(env) / "app.pid"

    def _start_app(self, env: Environment) -> None:
        """Write the host's app service script (start / stop, like a service manager) and start it.

        gunicorn imports the site once, before it forks its workers (--preload): each push and
        rollback restarts the app, and two workers each importing Django and Wagtail cost a
        second of CPU more per start. The pidfile comes after that import, so the start waits
        for it (up to 30 s on a busy machine): a site that cannot be imported fails the start,
        its traceback in app.log (--capture-output), rather than the health check after it. A
        start that runs out of time stops the gunicorn it began, which would else come up
        later without anyone knowing. No control socket: its default path ($XDG_RUNTIME_DIR/
        gunicorn.ctl, else ~/.gunicorn/gunicorn.ctl) is one for every gunicorn of the user,
        which each sandbox app, and each shard's, would take from the one before."""
        script = self.app_script(env)
        pidfile = self.app_pidfile(env)
        script.write_text(f"""#!/bin/sh
# The example site on {env.name}, served by gunicorn on {env.address}:{APP_PORT}.
# Written by `inv sandbox.up`; drydock's push stops and starts it like a service.
set -eu
pidfile={pidfile}
running() {{ [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }}
case "${{1:-}}" in
start)
    running && exit 0
    cd {example_site_dir()}
    DATABASE_URL='{self.url(env)}' DJANGO_SETTINGS_MODULE=wagtail_site.settings \\
        {sys.executable} -m gunicorn --daemon --pid "$pidfile" --bind {env.address}:{APP_PORT} --workers 2 --preload --capture-output \\
        --no-control-socket \\
        --access-logfile {self.host_dir(env)}/app.log --error-logfile {self.host_dir(env)}/app.log \\
        --name drydock-{env.name} wagtail_site.wsgi
    for _ in $(seq 300); do running && exit 0; sleep 0.1; done
    pkill -f -- "--pid $pidfile " || true  # this checkout's: another shard's app has the same --name
    echo "the app did not start: see {self.host_dir(env)}/app.log" >&2; exit 1 ;;
stop)
    running || exit 0
    kill "$(cat "$pidfile")"
    for _ in $(seq 100); do running || exit 0; sleep 0.1; done
    echo "the app did not stop" >&2; exit 1 ;;
*)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
""")
        script.chmod(0o700)
        _run([str(script), "start"])

    def _app_pid(self, env: Environment) -> int | None:
        """The PID in the host's app pidfile, if that process runs and is our gunicorn."""
        try:
            pid = int(self.app_pidfile(env).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._alive(pid, f"drydock-{env.name}") else None

    def _stop_app(self, env: Environment, say: Say | None = None) -> None:
        """Stop the host's app by the PID in its pidfile, if that process is our gunicorn."""
        pid = self._app_pid(env)
        if pid is not None:
            if not _stop(pid, signal.SIGTERM, f"drydock-{env.name}", children=True):
                raise SandboxError(f"the app on {env.name} (pid {pid}) did not stop; .sandbox/ left in place")
            (say or self.say)(f"  stopped app-{env.name} (pid {pid})")

    # -- seeding ------------------------------------------------------------------------
    def manage(self, env: Environment, *args: str) -> str:
        """Run the example site's manage.py against `env`'s database."""
        environ = dict(os.environ, DATABASE_URL=self.url(env), DJANGO_SETTINGS_MODULE="wagtail_site.settings")
        return _run([sys.executable, "manage.py", *args], env=environ, cwd=example_site_dir())

    def _seed(self, posts: int, paragraphs: int, bulk_posts: int) -> None:
        production, staging, _local = self.environments
        self.say("  production: migrating the example site (blog at its pre-Podcast migration)")
        self.manage(production, "migrate", "--noinput")
        self.manage(production, "migrate", "blog", PRODUCTION_BLOG_MIGRATION, "--noinput")
        self.say(f"  production: seeding {posts} posts")
        self.manage(production, "seed_demo", "--posts", str(posts), "--paragraphs", str(paragraphs),
                    "--hostname", production.site_hostname, "--port", str(production.site_port))
        self.say("  staging: restoring an older copy of production")
        self._copy_database(production, staging)
        self._psql(staging, DATABASE,
                   f"UPDATE wagtailcore_site SET hostname = '{staging.site_hostname}' WHERE is_default_site;\n"
                   f"UPDATE django_site SET domain = '{staging.site_hostname}';\n")
        # Production moves on after the copy, so staging really is older.
        self.manage(production, "seed_demo", "--offset", str(posts), "--posts", str(POSTS_ADDED_AFTER_STAGING_COPY))
        if bulk_posts:
            self.say(f"  production: adding {bulk_posts} posts in bulk (--scale)")
            self.manage(production, "seed_demo", "--offset", str(posts + POSTS_ADDED_AFTER_STAGING_COPY),
                        "--posts", "0", "--paragraphs", str(BULK_PARAGRAPHS), "--bulk", str(bulk_posts))
        self._record_seed(production, staging, posts_asked=posts, bulk_posts=bulk_posts)

    def _record_seed(self, *envs: Environment, posts_asked: int, bulk_posts: int) -> None:
        """Write .sandbox/seed.json: what `up` was asked for, and each server's posts and Site
        as seeded, so the state `up` made can be checked later, whatever pushes and pulls
        happened since."""
        seed: dict = {"posts_asked": posts_asked, "bulk_posts": bulk_posts}
        for env in envs:
            posts, site = self._psql(env, DATABASE, "SELECT (SELECT count(*) FROM blog_post),"
                                     " (SELECT hostname FROM wagtailcore_site WHERE is_default_site);").strip().split("|")
            seed[env.name] = {"posts": int(posts), "site": site}
        (self.root / "seed.json").write_text(json.dumps(seed, indent=2))

    def _copy_database(self, source: Environment, target: Environment) -> None:
        dump = subprocess.Popen([str(PG_BINDIR / "pg_dump"), "-Fc", "-d", self.url(source)], stdout=subprocess.PIPE)
        restore = subprocess.run([str(PG_BINDIR / "pg_restore"), "--no-owner", "--exit-on-error", "-d", self.url(target)],
                                 stdin=dump.stdout, capture_output=True, text=True)
        dump.stdout.close()
        if dump.wait() != 0 or restore.returncode != 0:
            raise SandboxError(f"copying {source.name} to {target.name} failed: {restore.stderr.strip()[-300:]}")

    def _write_env_files(self) -> None:
        env_json = {
            env.name: {
                "host": env.address,
                "port": PG_PORT,
                "socket_dir": str(self.socket_dir(env)),
                "database": DATABASE,
                "os_user": self.user,
                "app_role": APP_ROLE,
                "url": self.url(env),
                "site_hostname": env.site_hostname,
                "site_port": env.site_port,
                "backup_dir": str(self.host_dir(env) / "backups"),
                "pg_bindir": str(PG_BINDIR),  # the programs the clusters run with, for the playbooks too
            }
            for env in self.environments
        }
        connection = {
            "connection": "ssh" if ssh_available() else "local",
            "ssh_port": SSH_PORT,
            "ssh_user": getpass.getuser(),
            "ssh_key": str(self.ssh_dir / "id_ed25519"),
            "known_hosts": str(self.ssh_dir / "known_hosts"),
            "become": os.geteuid() == 0,
            # sudo where installed: Ansible cannot pipeline modules through su, which makes
            # every task over SSH several round trips (0.8 s instead of 0.3 s a task here).
            "become_method": "ansible.builtin.sudo" if shutil.which("sudo") else "ansible.builtin.su",
            "python": sys.executable,
        }
        for name, content in (("env.json", env_json), ("connection.json", connection)):
            fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(content, handle, indent=2)

    # -- down ---------------------------------------------------------------------------
    def down(self, quiet: bool = False) -> None:
        def tell(message: str) -> None:
            """Progress that may not stop the stopping: an output closed early (`| head`) would
            otherwise leave half the sandbox running."""
            if not quiet:
                try:
                    self.say(message)
                except OSError:
                    pass

        if self.root.exists():
            for env in self.environments:
                if env.server:
                    self._stop_app(env, tell)
        for key, entry in self._pids().items():
            pid, marker = entry["pid"], entry["marker"]
            if not self._alive(pid, marker):
                continue
            # SIGINT is PostgreSQL's fast shutdown (it stops its own children); sshd stops on
            # SIGTERM, but its open sessions (Ansible keeps a master connection for a minute)
            # are its children and would outlive it.
            postgres = key.startswith("postgres")
            if not _stop(pid, signal.SIGINT if postgres else signal.SIGTERM, marker, children=not postgres):
                raise SandboxError(f"{key} (pid {pid}) did not stop; .sandbox/ left in place")
            tell(f"  stopped {key} (pid {pid})")
        if self.root.exists():
            shutil.rmtree(self.root)
        tell("sandbox is down")

    def is_up(self) -> bool:
        if not (self.root / "env.json").exists():
            return False
        return all(self._alive(e["pid"], e["marker"]) for e in self._pids().values())
