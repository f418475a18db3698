"""The downtime probes: while a push runs, run a query the app needs on the live database
every 50 ms (DowntimeProbe, the issue's measure), and ask the app itself over HTTP as often
(AppProbe, every 250 ms); the longest stretch without a successful answer is each one's
downtime.

The probe keeps its connection, and connects again by the live database's name at once when
that connection is cut. Connecting anew every 50 ms (authentication and a new server process
each time) took about 14 ms of CPU a time, with the probe's thread a fifth of this 2-core
machine, from both pushes it measured: drydock's push took 68.2 s with it against 60.6 s
without (medians of 3 alternating, 2026-12-04). Keeping the connection sees the same gaps,
because both pushes end the live database's sessions where their downtime starts: the
runbook's `dropdb --force`, and drydock's swap, which ends them and renames in one
transaction (a database with sessions can't be renamed). From there the probe connects by
name, like any new session. What it would not see is a refusal of new sessions alone
(ALLOW_CONNECTIONS false, a connection limit): neither push does that to the live database."""
from __future__ import annotations

import threading
import time
import urllib.request

import psycopg

INTERVAL_S = 0.05
# The app is asked less often: one request costs about 19 ms of CPU in all (the app, its
# query, the probe; 200 requests took 3.8 CPU-seconds on 2026-12-07), so every 50 ms would
# take a third of a core from the push it measures, and drydock's keeps both cores busy.
APP_INTERVAL_S = 0.25
APPLICATION_NAME = "drydock-bench-probe"  # how its session shows in pg_stat_activity
# An app query that needs the data, not just the database: an empty database freshly
# created by the runbook's createdb fails it, as does a table not yet loaded.
QUERY = ("SELECT s.hostname FROM wagtailcore_site s JOIN wagtailcore_page p ON p.id = s.root_page_id"
         " WHERE s.is_default_site")


class GapProbe:
    """Ask something every `interval_s` in a thread between start() and stop();
    `longest_gap_s` is the longest time between two answers that said up (each subclass says
    what is up)."""

    def __init__(self, name: str, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self.longest_gap_s = 0.0
        self.successes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _ask(self) -> bool:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _loop(self) -> None:
        last_up = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            if self._ask():
                now = time.monotonic()
                self.longest_gap_s = max(self.longest_gap_s, now - last_up)
                last_up = now
                self.successes += 1
            else:
                self.failures += 1
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        # Still down when the push ended counts up to now.
        self.longest_gap_s = max(self.longest_gap_s, time.monotonic() - last_up)
        self._close()


class DowntimeProbe(GapProbe):
    """The live database: connection refused, query failed or waiting on a lock all count as
    down."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        super().__init__("downtime-probe")
        self.url = url
        self.timeout_s = timeout_s
        self.cuts = 0  # times the kept connection was cut (and the probe connected again)
        self._conn: psycopg.Connection | None = None

    def _ask(self) -> bool:
        kept = self._conn is not None
        if self._try():
            return True
        if kept and self._conn is None:  # a kept connection was cut: connect again now, as a new session would
            self.cuts += 1
            return self._try()
        return False

    def _try(self) -> bool:
        try:
            if self._conn is None:
                # No prepared statements: a plan cached on this connection can't outlive a swap.
                self._conn = psycopg.connect(
                    self.url, connect_timeout=max(1, int(self.timeout_s)), autocommit=True, prepare_threshold=None,
                    application_name=APPLICATION_NAME, options=f"-c statement_timeout={int(self.timeout_s * 1000)}")
            return self._conn.execute(QUERY).fetchone() is not None
        except psycopg.OperationalError:  # the connection was cut, or the query waited too long
            self._close()
        except psycopg.Error:  # e.g. no such table yet in a database just created
            if self._conn is not None and self._conn.closed:
                self._close()
        return False

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class AppProbe(GapProbe):
    """The site as its users see it: the app's health URL, asked every 250 ms, must answer
    200 within `timeout_s`. The example site's /healthz reads the default Site's root page,
    as the database probe's query does. drydock's push stops the app around its swap and
    starts it again: the database probe sees none of that, this one does."""

    def __init__(self, url: str, timeout_s: float = 5.0):
        super().__init__("app-probe", APP_INTERVAL_S)
        self.url = url
        self.timeout_s = timeout_s

    def _ask(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                return response.status == 200
        except (OSError, ValueError):  # refused, timed out, or an HTTP error status
            return False
