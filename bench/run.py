"""./inv bench: drydock against the hand-written runbook, measured in the same run.

Builds the sandbox at the benchmark scale (production ~1 GB: Wagtail pages with long
bodies, JSON revisions, a wide indexed log table), then, run after run, lets each of the
two pull production and push that local database to staging, as its user would, the one
that goes first alternating:
  pull:  the runbook (pg_dump | gzip, copy, dropdb/createdb, gunzip | psql)  vs  inv pull production
  push:  the same towards staging                                            vs  inv push staging
         with probes asking staging's live database every 50 ms and its app every 250 ms (the downtime)
  reset: inv snapshot.restore  vs  a FILE_COPY template copy  vs  restoring the dump again
         (the copy is timed once the restore's background work is done; the restore's
         database work alone is read from its journal)
with autovacuum off and, untimed before each step, the vacuums, checkpoints and sync that a
load calls for (bench/quiet.py), so that no step pays for the one before it,
and writes the medians to bench/results/<timestamp>.json (and latest.json) and a
markdown table (printed, and beside the JSON).

The two pulls do not leave the same database: psql's restore keeps the server's default
TOAST compression (pglz), drydock's is lz4, and pg_dump reads the pglz one 1.7-2.5 s slower
(5.8-6.6 s against 4.1 s, the same 1 GB restored both ways here). Until the bench of
2026-12-05T15:15Z both pulls ran before both pushes, so each push dumped whichever side's
pull came last: drydock's push the runbook's pull in every second run, the runbook's push
drydock's in the others (docs/performance.md).

The whole bench keeps within a time budget (--minutes, 20 by default): a run is started
only if one more, 25% longer than the longest so far, would end inside it. The runbook's gzip
makes most of a run, and how fast a machine gzips varies by twice from day to day here;
the result says how many runs fitted.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psycopg

from bench.host import StolenCpu, gzip_check_s
from bench.memory import PeakMemory
from bench.probe import AppProbe, DowntimeProbe
from bench.quiet import QuietClusters
from bench.runbook import Runbook, RunbookError
from drydock import journal
from drydock.cli import command
from drydock.errors import DrydockError
from drydock.paths import project_root
from drydock.sandbox import APP_PORT, DATABASE, Sandbox, SandboxError, bulk_posts_for

Say = Callable[[str], None]
SNAPSHOT = "bench"
# The budget assumes the next run may take 25% longer than the longest so far: on this host
# runs drift by a few percent (10.3 min after 9.9) and three runs of 5.7 min still fit in 20.
# A host that slows down by far more mid-bench (5.5 then 10.2 min once) can still overrun it.
RUN_SLOWDOWN = 1.25
REPORT_S = 15  # writing the report


class BenchError(DrydockError):
    """The benchmark cannot run or a measured command failed; the message is one line."""


def results_dir() -> Path:
    return project_root() / "bench" / "results"


class Bench:
    def __init__(self, scale: str, runs: int, minutes: int = 20, say: Say = print):
        self.scale = scale
        self.runs = runs
        self.minutes = minutes  # 0: no budget
        self.say = say
        self.sandbox = Sandbox(say=say)
        self.samples: dict[str, list[dict]] = {}
        self.quiet: QuietClusters | None = None  # set while the runs go on

    # -- setup ------------------------------------------------------------------------
    def prepare(self) -> float:
        """Bring the sandbox up at the benchmark scale; refuse one already up at another."""
        wanted_posts = bulk_posts_for(self.scale)
        if self.sandbox.is_up():
            seed = json.loads((self.sandbox.root / "seed.json").read_text())
            if seed.get("bulk_posts") != wanted_posts:
                raise BenchError(f"the sandbox is up at another scale ({seed.get('bulk_posts', 0)} bulk posts, "
                                 f"{self.scale!r} needs {wanted_posts}): ./inv sandbox.down first, bench builds its own")
            return 0.0
        started = time.monotonic()
        self.sandbox.up(bulk_posts=wanted_posts)
        return time.monotonic() - started

    def envs(self) -> dict:
        return json.loads((self.sandbox.root / "env.json").read_text())

    def reach(self) -> str:
        """How Ansible reached the sandbox's hosts, which weighs on every task (`su` cannot
        pipeline): a bench on a machine without sudo or sshd is not like the others."""
        try:
            conn = json.loads((self.sandbox.root / "connection.json").read_text())
            return f"{conn['connection']} connections, become by {conn['become_method'].rsplit('.', 1)[-1]}"
        except (OSError, ValueError, KeyError):
            return "unknown"

    def sshd_pids(self) -> set[int]:
        pids = json.loads(self.sandbox.pids_file.read_text())
        return {entry["pid"] for key, entry in pids.items() if key.startswith("sshd")}

    def host_addresses(self) -> set[str]:
        """The servers' loopback addresses, which Ansible's SSH masters connect to."""
        return {env["host"] for name, env in self.envs().items() if name != "local"}

    def database_bytes(self, env: str) -> int:
        with psycopg.connect(self.envs()[env]["url"]) as conn:
            return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]

    # -- drydock ----------------------------------------------------------------------
    def inv(self, *args: str) -> dict:
        """Run an inv command as a user would; its wall time, peak memory and journal."""
        before = set(journal.run_folders())
        started = time.monotonic()
        sshd, addresses = self.sshd_pids(), self.host_addresses()  # read before anything starts
        # In a session of its own, so that a Ctrl-C reaches it once, from here (below).
        proc = subprocess.Popen([*command(project_root()), *args], cwd=project_root(), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        memory = None
        try:
            memory = PeakMemory(proc.pid, sshd, addresses)
            output, _ = proc.communicate()
            seconds = time.monotonic() - started
        except BaseException:
            # Stopped: the command stops as on Ctrl-C and says what it left, which the bench
            # waits for, whatever else it is sent meanwhile, and shows. It writes to this
            # pipe: a bench gone would fail those lines, and with them its clean-up.
            proc.send_signal(signal.SIGINT)
            self.say(f"    inv {' '.join(args)} interrupted: waiting for it to stop (it may restart an app)")
            while True:
                try:
                    output, _ = proc.communicate()
                    break
                except (KeyboardInterrupt, SystemExit):
                    continue
            self.say(f"    inv {' '.join(args)}, interrupted: {' '.join(output.strip().splitlines()[-1:])}")
            raise
        finally:
            if memory is not None:
                memory.stop()
        if proc.returncode != 0:
            raise BenchError(f"inv {' '.join(args)} failed: {output.strip().splitlines()[-1:]}")
        new_runs = sorted(set(journal.run_folders()) - before)
        steps = journal.read(new_runs[-1]) if new_runs else []
        return {"seconds": seconds, "peak_rss_bytes": memory.peak_total, "peak_process_rss_bytes": memory.peak_process,
                "steps": {s["step"]: s.get("seconds") for s in steps},
                "bytes": next((s["bytes"] for s in steps if "bytes" in s), None),
                # A snapshot restore's database work alone, as its module timed it.
                "database_s": next((s["database_s"] for s in steps if "database_s" in s), None)}

    def wait_for_snapshot_work(self, timeout_s: float = 600.0) -> float:
        """Wait until the work a save or restore leaves to the background is done (the next ready copy
        made, the replaced generation dropped), so that it does not slow what is measured
        next; returns how long that took after the command had returned."""
        started = time.monotonic()
        snapshot, ready = f"{DATABASE}__snap_{SNAPSHOT}", f"{DATABASE}__ready_{SNAPSHOT}"
        aside = f"{DATABASE}__previous__old"
        with psycopg.connect(self.envs()["local"]["url"], autocommit=True) as conn:
            while time.monotonic() - started < timeout_s:
                rows = dict(conn.execute("SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database"
                                         " WHERE datname IN (%s, %s)", (ready, aside)).fetchall())
                oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (snapshot,)).fetchone()
                # prepare writes the ready copy's record, naming the snapshot's oid, last
                if aside not in rows and oid and json.loads(rows.get(ready) or "{}").get("snapshot_oid") == oid[0]:
                    return time.monotonic() - started
                time.sleep(0.05)
        raise BenchError(f"the snapshot's ready copy was not made again within {timeout_s:.0f} s")

    # -- the measurements ---------------------------------------------------------------
    def measure(self, name: str, action: Callable[[], dict], probe: bool = False) -> dict:
        """Run one measured step and record it with how fast the host was (a gzip check just
        before, the CPU stolen during) and, for a push, staging's downtime; the sample."""
        gzip_s = gzip_check_s()
        with StolenCpu() as host:
            if probe:
                with self.staging_probe() as staging, self.app_probe() as app:
                    sample = action()
                sample["downtime_s"] = staging.longest_gap_s
                sample["app_downtime_s"] = app.longest_gap_s
            else:
                sample = action()
        sample.update(steal_pct=host.percent, iowait_pct=host.iowait_percent, gzip_check_s=gzip_s)
        self.samples.setdefault(name, []).append(sample)
        extra = (f", downtime {sample['downtime_s']:.2f} s (the database), {sample['app_downtime_s']:.2f} s (the app)"
                 if "downtime_s" in sample else "")
        self.say(f"    {name}: {sample['seconds']:.1f} s{extra} (host: gzip check {gzip_s:.2f} s before,"
                 f" {host.percent:.0f}% of the CPU stolen and {host.iowait_percent:.0f}% waiting for the disk during)")
        return sample

    def staging_probe(self) -> DowntimeProbe:
        return DowntimeProbe(self.envs()["staging"]["url"])

    def app_probe(self) -> AppProbe:
        return AppProbe(f"http://{self.envs()['staging']['host']}:{APP_PORT}/healthz")

    def pull_and_push(self, runbook: Runbook, drydock_first: bool) -> None:
        """Each of the two pulls production, then pushes that local database to staging (see
        the module's docstring), the one that goes first alternating from run to run."""
        order = [("drydock", lambda: self.inv("pull", "production"), lambda: self.inv("push", "staging")),
                 ("runbook", lambda: runbook.pull("production", "local"), lambda: runbook.push("local", "staging"))]
        for who, pull, push in (order if drydock_first else reversed(order)):
            self.quiet.settle()
            self.measure(f"{who} pull", pull)
            self.say(f"    vacuuming the pulled local database: {self.quiet.settle('local'):.1f} s")
            self.measure(f"{who} push", push, probe=True)

    def reset_trio(self, runbook: Runbook) -> None:
        self.quiet.settle()
        restore = self.measure("snapshot restore", lambda: self.inv("snapshot.restore", SNAPSHOT))
        # Untimed: the restore's background work must not slow the copy measured next.
        restore["background_s"] = self.wait_for_snapshot_work()
        self.quiet.settle()
        self.measure("template FILE_COPY", lambda: runbook.template_copy("local"))
        self.quiet.settle()
        self.measure("restore the dump again", lambda: self.inv("pull", "production", "--latest"))

    def another_run_fits(self, started: float, longest_run_s: float) -> bool:
        if not self.minutes:
            return True
        # A fixed 15-second margin let a bench end at 20.2 min (RUN_SLOWDOWN says why 25%).
        return time.monotonic() - started + longest_run_s * RUN_SLOWDOWN + REPORT_S <= self.minutes * 60

    def run(self) -> dict:
        started = time.monotonic()
        seed_s = self.prepare()
        runbook = Runbook(self.sandbox, self.sandbox.root / "bench")
        db_bytes = self.database_bytes("production")
        budget = f" within {self.minutes} minutes" if self.minutes else ""
        self.say(f"==> production holds {db_bytes / 1e9:.2f} GB; up to {self.runs} alternating runs of each{budget}")
        longest_run_s, done = 0.0, 0
        with QuietClusters(self.envs()) as self.quiet:
            self.say(f"    vacuuming production, autovacuum off until the end: {self.quiet.settle('production'):.1f} s")
            for number in range(self.runs):
                if number and not self.another_run_fits(started, longest_run_s):
                    self.say(f"--- stopping after {done} of {self.runs} runs: one more ({longest_run_s * RUN_SLOWDOWN / 60:.1f} min)"
                             f" would end past the {self.minutes}-minute budget (--minutes)")
                    break
                run_started = time.monotonic()
                drydock_first = number % 2 == 1
                self.say(f"--- run {number + 1}/{self.runs}")
                self.pull_and_push(runbook, drydock_first)
                if number == 0:
                    self.inv("snapshot.save", SNAPSHOT, "--force")
                    self.wait_for_snapshot_work()  # its ready copy, made in the background
                self.reset_trio(runbook)
                longest_run_s, done = max(longest_run_s, time.monotonic() - run_started), done + 1
        return self.report(db_bytes, seed_s, self.quiet.settle_s, done, time.monotonic() - started)

    # -- the report --------------------------------------------------------------------
    def median(self, name: str, key: str = "seconds") -> float:
        return statistics.median(s[key] for s in self.samples[name] if is_number(s.get(key)))

    def pair_ratios(self, what: str) -> list[float]:
        return [round(runbook["seconds"] / drydock["seconds"], 2)
                for runbook, drydock in zip(self.samples[f"runbook {what}"], self.samples[f"drydock {what}"])]

    def report(self, db_bytes: int, seed_s: float, settle_s: float, runs: int, elapsed_s: float) -> dict:
        # A figure one run lacks (e.g. a journal it did not write) is the median of the others.
        medians = {name: {key: self.median(name, key) for key in dict.fromkeys(k for s in samples for k in s)
                          if any(is_number(s.get(key)) for s in samples)}
                   for name, samples in self.samples.items()}
        result = {
            "db_bytes": db_bytes,
            "pull_ratio": round(self.median("runbook pull") / self.median("drydock pull"), 2),
            "push_ratio": round(self.median("runbook push") / self.median("drydock push"), 2),
            "push_downtime_s": round(self.median("drydock push", "downtime_s"), 3),
            "runbook_push_downtime_s": round(self.median("runbook push", "downtime_s"), 3),
            # The site as its users see it: drydock's push stops the app around its swap.
            "push_app_downtime_s": round(self.median("drydock push", "app_downtime_s"), 3),
            "runbook_push_app_downtime_s": round(self.median("runbook push", "app_downtime_s"), 3),
            "snapshot_restore_s": round(self.median("snapshot restore"), 3),
            "template_file_copy_s": round(self.median("template FILE_COPY"), 3),
            # None if no restore's journal said (a run killed in between): the rest still stands.
            "snapshot_database_s": round_or_none(medians["snapshot restore"].get("database_s")),
            "snapshot_background_s": round(self.median("snapshot restore", "background_s"), 3),
            "snapshot_ratio": round(self.median("snapshot restore") / self.median("template FILE_COPY"), 2),
            "dump_restore_again_s": round(self.median("restore the dump again"), 3),
            # Run by run, each pair measured minutes apart: how far a busy host moved the ratio.
            "pull_pair_ratios": self.pair_ratios("pull"),
            "push_pair_ratios": self.pair_ratios("push"),
            "steal_pct_max": max(s.get("steal_pct", 0.0) for samples in self.samples.values() for s in samples),
            "runs": runs,
            "runs_asked": self.runs,
            "minutes_budget": self.minutes,
            "scale": self.scale,
            "seed_s": round(seed_s, 1),
            "settle_s": round(settle_s, 1),  # untimed vacuums and checkpoints between steps (bench/quiet.py)
            "elapsed_s": round(elapsed_s, 1),
            "medians": medians,
            "samples": self.samples,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                        "sandbox": self.reach()},
            "settings": settings(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return result


def round_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def settings() -> dict:
    """The dump and restore settings measured (from the roles' defaults)."""
    import yaml

    root = project_root() / "roles"
    backup = yaml.safe_load((root / "pg_backup" / "defaults" / "main.yml").read_text())
    restore = yaml.safe_load((root / "pg_restore" / "defaults" / "main.yml").read_text())
    level = backup["pg_backup_compress"]
    dump = (f"pg_dump --format=custom --compress=0 | zstd -{level}" if backup["pg_backup_compression"] == "zstd"
            else f"pg_dump --format=custom --compress={level}")
    return {"dump": dump,
            "restore": f"pg_restore --jobs={restore['pg_restore_jobs']}",
            "toast_compression": restore["pg_restore_toast_compression"]}


def table(result: dict) -> str:
    m = result["medians"]

    def row(what: str, runbook: str, drydock: str, ratio: str) -> str:
        return f"| {what} | {runbook} | {drydock} | {ratio} |"

    database_s = result["snapshot_database_s"]

    def mb(value: float | None) -> str:
        return f"{value / 1e6:,.0f} MB" if value else "-"

    lines = [
        f"drydock bench, {result['finished']}: production {result['db_bytes'] / 1e9:.2f} GB, "
        f"{'median of ' + str(result['runs']) + ' alternating runs' if result['runs'] > 1 else 'one run'}, "
        f"{result['machine']['cpus']} cores, hosts reached by {result['machine']['sandbox']}, "
        f"{result['elapsed_s'] / 60:.1f} minutes in all (building the sandbox: {result['seed_s'] / 60:.1f}, "
        f"vacuums and checkpoints between steps: {result['settle_s'] / 60:.1f})",
        "",
        "| | runbook | drydock | runbook / drydock |",
        "|---|---:|---:|---:|",
        row("pull production → local", f"{m['runbook pull']['seconds']:.1f} s", f"{m['drydock pull']['seconds']:.1f} s",
            f"**{result['pull_ratio']:.2f}×**"),
        row("push local → staging", f"{m['runbook push']['seconds']:.1f} s", f"{m['drydock push']['seconds']:.1f} s",
            f"**{result['push_ratio']:.2f}×**"),
        row("staging's downtime during the push: its database (a query every 50 ms)",
            f"{result['runbook_push_downtime_s']:.2f} s", f"{result['push_downtime_s']:.2f} s", ""),
        row("… its site (the app's /healthz every 250 ms; drydock stops the app around its swap)",
            f"{result['runbook_push_app_downtime_s']:.2f} s", f"{result['push_app_downtime_s']:.2f} s", ""),
        row("dump on the wire (pull)", mb(m["runbook pull"].get("bytes")), mb(m["drydock pull"].get("bytes")), ""),
        row("peak memory of drydock's processes, all / the largest (pull)", "",
            f"{mb(m['drydock pull']['peak_rss_bytes'])} / {mb(m['drydock pull']['peak_process_rss_bytes'])}", ""),
        row("peak memory of drydock's processes, all / the largest (push)", "",
            f"{mb(m['drydock push']['peak_rss_bytes'])} / {mb(m['drydock push']['peak_process_rss_bytes'])}", ""),
        "",
        "| local reset | seconds | vs FILE_COPY |",
        "|---|---:|---:|",
        f"| inv snapshot.restore | {result['snapshot_restore_s']:.2f} | {result['snapshot_ratio']:.2f}× |",
        (f"| … of which its database work (the lock, the checks, the renames) | {database_s:.2f} | "
         f"{database_s / result['template_file_copy_s']:.2f}× |" if database_s is not None else
         "| … of which its database work (the lock, the checks, the renames) | - | |"),
        f"| … then, in the background, its next ready copy | {result['snapshot_background_s']:.2f} | |",
        f"| CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY | {result['template_file_copy_s']:.2f} | 1.00× |",
        f"| restore the dump again (inv pull --latest) | {result['dump_restore_again_s']:.2f} | "
        f"{result['dump_restore_again_s'] / result['template_file_copy_s']:.1f}× |",
        "",
        "runbook phases (dump / copy / restore): pull "
        + " / ".join(f"{m['runbook pull'][k]:.1f}" for k in ("dump_s", "copy_s", "restore_s"))
        + " s, push " + " / ".join(f"{m['runbook push'][k]:.1f}" for k in ("dump_s", "copy_s", "restore_s")) + " s",
        "ratios run by run: pull " + ", ".join(f"{r:.2f}" for r in result["pull_pair_ratios"])
        + "; push " + ", ".join(f"{r:.2f}" for r in result["push_pair_ratios"]),
        "the host, run by run (a gzip check before; the CPU stolen, and waiting for the disk, during): "
        + "; ".join(f"{name} " + ", ".join(f"{s.get('gzip_check_s', 0.0):.2f} s {s.get('steal_pct', 0.0):.0f}%"
                                           f" {s.get('iowait_pct', 0.0):.0f}%"
                                           for s in result["samples"][name])
                    for name in ("runbook pull", "drydock pull", "runbook push", "drydock push")),
        f"settings: {result['settings']['dump']}, {result['settings']['restore']}, "
        f"TOAST compression {result['settings']['toast_compression'] or 'server default'} during restores",
    ]
    return "\n".join(lines)


def write(result: dict, text: str) -> Path:
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}.json"
    for target in (path, folder / "latest.json"):
        target.write_text(json.dumps(result, indent=2) + "\n")
    for target in (folder / f"{stamp}.md", folder / "latest.md"):
        target.write_text(text + "\n")
    return path


def main(scale: str = "bench", runs: int = 3, minutes: int = 20, say: Say = print) -> dict:
    try:
        result = Bench(scale, runs, minutes, say).run()
    except (SandboxError, RunbookError) as error:
        raise BenchError(str(error)) from None
    text = table(result)
    path = write(result, text)
    say("\n" + text + f"\n\nresults: {path} (and {path.parent / 'latest.json'})\n"
        "the sandbox stays up at this scale, for another bench to reuse: ./inv sandbox.down stops it")
    return result
