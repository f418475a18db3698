"""Keep each measured step from paying for background work that the step before it set off.

About a minute after a 1 GB load (psql's or pg_restore's), autovacuum starts. It reads and
rewrites every page of the loaded tables (hint bits, the visibility map) for a minute or
more, competing with whichever step came next. On 2026-12-03 the local database's
autovacuum ran from 05:10:51 to 05:12:09, all through the next push's dump. So for the
length of the bench, autovacuum is off on the sandbox's clusters (a bench killed outright
leaves it off until ./inv sandbox.down discards them). Between steps, untimed,
the bench does itself what autovacuum would have done:
  - it vacuums and analyzes production once, after seeding;
  - it vacuums and analyzes the local database after each pull, as autovacuum would while
    its user migrates it, before the push that follows dumps it;
  - before every measured step, it runs CHECKPOINT on every cluster and then sync, so that
    the pages the step before wrote are on disk first. A 1 GB load leaves the kernel up to
    0.7 GB of dirty pages (seen in /proc/meminfo during the bench), and writing them out
    on this disk (mounted with discard) competes with the step that follows.
The same happens before drydock's steps and before the runbook's: it favours neither side.
"""
from __future__ import annotations

import os
import time

from bench.runbook import as_db_user, pg_command
from drydock.sandbox import DATABASE

# Cancels the autovacuum workers already running: with autovacuum off, none starts again.
CANCEL_AUTOVACUUM = ("SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity"
                     " WHERE backend_type = 'autovacuum worker'")


class QuietClusters:
    """A context in which the sandbox's clusters run no autovacuum; settle() between steps."""

    def __init__(self, envs: dict):
        self.envs = envs  # env.json: name -> socket_dir, port, ...
        self.settle_s = 0.0  # time spent settling, reported beside the measurements

    def _sql(self, env: str, *statements: str) -> None:
        # One -c per statement: psql runs each in its own transaction (ALTER SYSTEM needs that).
        psql = pg_command(self.envs[env], "psql")
        as_db_user(f"{psql} -X -q -o /dev/null -d postgres " + " ".join(f"-c \"{s}\"" for s in statements))

    def __enter__(self) -> QuietClusters:
        for env in self.envs:
            self._sql(env, "ALTER SYSTEM SET autovacuum = off", "SELECT pg_reload_conf()", CANCEL_AUTOVACUUM)
        return self

    def __exit__(self, *exc) -> None:
        for env in self.envs:
            self._sql(env, "ALTER SYSTEM RESET autovacuum", "SELECT pg_reload_conf()")

    def settle(self, *vacuum: str) -> float:
        """VACUUM (ANALYZE) the app database of the environments named, then CHECKPOINT all
        clusters and write the kernel's dirty pages out."""
        started = time.monotonic()
        for env in vacuum:
            as_db_user(f"{pg_command(self.envs[env], 'vacuumdb')} --quiet --analyze --jobs=2 {DATABASE}")
        for env in self.envs:
            self._sql(env, "CHECKPOINT")
        os.sync()
        seconds = time.monotonic() - started
        self.settle_s += seconds
        return seconds
