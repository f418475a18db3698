"""The hand-written runbook drydock replaces, as its users run it, against the sandbox:
`pg_dump | gzip` on the source host, a copy, then `dropdb`/`createdb` and `gunzip -c | psql`
on the destination. Database commands run as the clusters' OS user on each host's socket
(the hosts are this machine); copies go over the sandbox's SSH when it has it, like
drydock's. Each step is timed."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from drydock.paths import PG_BINDIR
from drydock.sandbox import DATABASE, Sandbox


class RunbookError(RuntimeError):
    pass


def as_db_user(script: str) -> None:
    """Run a shell pipeline as the clusters' OS user, failing on any stage's error."""
    kwargs: dict = {}
    if os.geteuid() == 0:
        kwargs.update(user="postgres", group="postgres", extra_groups=[])
    proc = subprocess.run(["bash", "-c", "set -euo pipefail; " + script], capture_output=True, text=True,
                          cwd="/", **kwargs)
    if proc.returncode != 0:
        raise RunbookError(f"runbook step failed: {proc.stderr.strip()[-300:]}")


def pg_command(env: dict, program: str) -> str:
    """A PostgreSQL client program on an environment's socket (env: its entry in env.json)."""
    return f"{PG_BINDIR / program} -h {shlex.quote(env['socket_dir'])} -p {env['port']}"


class Runbook:
    def __init__(self, sandbox: Sandbox, work: Path):
        self.sandbox = sandbox
        self.envs = json.loads((sandbox.root / "env.json").read_text())
        self.conn = json.loads((sandbox.root / "connection.json").read_text())
        self.work = work  # the controller's folder for runbook dumps (0700)
        self.work.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _pg(self, env: str, program: str) -> str:
        return pg_command(self.envs[env], program)

    def _host_file(self, env: str) -> Path:
        folder = Path(self.envs[env]["backup_dir"]) / "runbook"
        return folder / f"{DATABASE}.sql.gz"

    def _copy(self, source: str | Path, dest: str | Path, address: str | None = None, upload: bool = False) -> None:
        """scp over the sandbox's SSH (what the runbook does), or cp when it has none."""
        if self.conn["connection"] != "ssh" or address is None:
            subprocess.run(["cp", str(source), str(dest)], check=True)
            return
        remote = f"{self.conn['ssh_user']}@{address}:"
        args = [str(source), remote + str(dest)] if upload else [remote + str(source), str(dest)]
        subprocess.run(["scp", "-q", "-P", str(self.conn["ssh_port"]), "-i", self.conn["ssh_key"],
                        "-o", f"UserKnownHostsFile={self.conn['known_hosts']}", "-o", "IdentitiesOnly=yes", *args],
                       check=True)

    def dump(self, env: str) -> tuple[Path, float]:
        """`pg_dump db | gzip > file` on `env`'s host."""
        target = self._host_file(env)
        started = time.monotonic()
        as_db_user(f"umask 077; mkdir -p {shlex.quote(str(target.parent))}; "
                   f"{self._pg(env, 'pg_dump')} {DATABASE} | gzip > {shlex.quote(str(target))}")
        return target, time.monotonic() - started

    def restore(self, env: str, dump: Path) -> float:
        """`dropdb`, `createdb`, `gunzip -c dump | psql` on `env`'s host: from here on the
        database is gone until psql has finished."""
        started = time.monotonic()
        as_db_user(f"{self._pg(env, 'dropdb')} --force --if-exists {DATABASE}; "
                   f"{self._pg(env, 'createdb')} -O {self.envs[env]['app_role']} {DATABASE}; "
                   f"gunzip -c {shlex.quote(str(dump))} | {self._pg(env, 'psql')} -q -X -o /dev/null {DATABASE}")
        return time.monotonic() - started

    def template_copy(self, env: str) -> dict:
        """`CREATE DATABASE ... TEMPLATE db STRATEGY FILE_COPY` by hand in psql: the floor
        for any reset of a local database (a throwaway copy, dropped afterwards)."""
        copy = f"{DATABASE}__bench_copy"
        started = time.monotonic()
        as_db_user(f"{self._pg(env, 'psql')} -X -q -d postgres -c "
                   f"'CREATE DATABASE {copy} TEMPLATE {DATABASE} STRATEGY FILE_COPY'")
        seconds = time.monotonic() - started
        as_db_user(f"{self._pg(env, 'dropdb')} {copy}")
        return {"seconds": seconds}

    def pull(self, source: str = "production", dest: str = "local") -> dict:
        """Dump on the source host, copy to the controller, restore locally."""
        host_file, dump_s = self.dump(source)
        fetched = self.work / host_file.name
        started = time.monotonic()
        self._copy(host_file, fetched, self.envs[source]["host"])
        copy_s = time.monotonic() - started
        size = fetched.stat().st_size
        self._stage_for_db_user(fetched)
        restore_s = self.restore(dest, self._staged(fetched))
        return {"dump_s": dump_s, "copy_s": copy_s, "restore_s": restore_s,
                "seconds": dump_s + copy_s + restore_s, "bytes": size}

    def push(self, source: str = "local", dest: str = "staging") -> dict:
        """Dump the local database, copy it to the target host, restore it there."""
        local_file, dump_s = self.dump(source)
        uploaded = self._host_file(dest)
        started = time.monotonic()
        as_db_user(f"umask 077; mkdir -p {shlex.quote(str(uploaded.parent))}")
        self._copy(local_file, uploaded, self.envs[dest]["host"], upload=True)
        copy_s = time.monotonic() - started
        self._give_to_db_user(uploaded)
        restore_s = self.restore(dest, uploaded)
        return {"dump_s": dump_s, "copy_s": copy_s, "restore_s": restore_s,
                "seconds": dump_s + copy_s + restore_s, "bytes": uploaded.stat().st_size}

    # The controller's copy lives in a folder the database's OS user cannot enter; the
    # local restore reads a copy handed over beside the local cluster.
    def _staged(self, fetched: Path) -> Path:
        return Path(self.envs["local"]["backup_dir"]) / "runbook" / fetched.name

    def _stage_for_db_user(self, fetched: Path) -> None:
        staged = self._staged(fetched)
        as_db_user(f"umask 077; mkdir -p {shlex.quote(str(staged.parent))}")
        os.replace(fetched, staged)
        self._give_to_db_user(staged)

    @staticmethod
    def _give_to_db_user(path: Path) -> None:
        if os.geteuid() == 0:  # as root, the clusters' OS user is postgres
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)
