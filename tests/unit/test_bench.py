"""The bench's report: the ratios it states come from the samples it measured, and each
sample says how much CPU the host stole while it ran."""
import json
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

from bench.host import IOWAIT, StolenCpu, cpu_times, gzip_check_s, share_percent
from bench.memory import ssh_masters
from bench.run import Bench, table


def stat_file(path: Path, user: int, idle: int, steal: int, iowait: int = 0) -> Path:
    # The kernel's layout: cpu user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0\n"
                    f"cpu0 {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0\n")
    return path


def test_stolen_and_iowait_shares_are_their_ticks_over_all_ticks_spent(tmp_path):
    before = cpu_times(stat_file(tmp_path / "a", user=100, idle=100, steal=0, iowait=5))
    after = cpu_times(stat_file(tmp_path / "b", user=150, idle=120, steal=10, iowait=25))
    assert share_percent(before, after) == 10.0  # steal: 10 of 50 + 20 + 20 + 10 ticks
    assert share_percent(before, after, IOWAIT) == 20.0  # 20 of the same 100
    assert share_percent(after, after) == 0.0  # no tick in between: nothing stolen, no division by zero


def test_stolen_cpu_reads_this_machine():
    with StolenCpu() as host:
        sum(range(200_000))
    assert 0.0 <= host.percent <= 100.0 and 0.0 <= host.iowait_percent <= 100.0


def test_gzip_check_times_real_work():
    assert 0.001 < gzip_check_s() < 60


def sample(seconds: float, steal: float, **extra) -> dict:
    return {"seconds": seconds, "steal_pct": steal, "iowait_pct": steal / 2, "gzip_check_s": 0.3 + steal / 100, **extra}


def runbook(seconds: float, steal: float, **extra) -> dict:
    return sample(seconds, steal, dump_s=seconds * 0.6, copy_s=1.0, restore_s=seconds * 0.4 - 1.0, **extra)


def drydock(seconds: float, steal: float, **extra) -> dict:
    return sample(seconds, steal, peak_rss_bytes=230e6, peak_process_rss_bytes=60e6, **extra)


def test_report_states_ratios_of_medians_and_each_pair():
    bench = Bench("bench", runs=3, minutes=0, say=lambda _line: None)
    bench.samples = {
        "runbook pull": [runbook(120, 0), runbook(190, 30), runbook(130, 1)],
        "drydock pull": [drydock(30, 0), drydock(95, 25), drydock(26, 2)],
        "runbook push": [runbook(125, 0, downtime_s=40.0, app_downtime_s=39.0),
                         runbook(250, 16, downtime_s=85.0, app_downtime_s=84.0),
                         runbook(120, 0, downtime_s=41.0, app_downtime_s=40.0)],
        "drydock push": [drydock(35, 1, downtime_s=0.1, app_downtime_s=7.5),
                         drydock(100, 18, downtime_s=0.2, app_downtime_s=9.0),
                         drydock(40, 0, downtime_s=0.1, app_downtime_s=7.0)],
        "snapshot restore": [sample(1.2, 0, background_s=0.3, database_s=0.03)] * 3,
        "template FILE_COPY": [sample(0.5, 0)] * 3,
        "restore the dump again": [sample(15, 0)] * 3,
    }
    result = bench.report(db_bytes=10**9, seed_s=0, settle_s=0, runs=3, elapsed_s=600)
    assert result["pull_ratio"] == round(130 / 30, 2)  # medians, not a mean of ratios
    assert result["push_ratio"] == round(125 / 40, 2)
    assert result["pull_pair_ratios"] == [4.0, 2.0, 5.0]
    assert result["push_pair_ratios"] == [3.57, 2.5, 3.0]
    assert result["steal_pct_max"] == 30
    assert result["push_downtime_s"] == 0.1 and result["runbook_push_downtime_s"] == 41.0
    assert result["push_app_downtime_s"] == 7.5 and result["runbook_push_app_downtime_s"] == 40.0
    text = table(result)
    assert f" cores, hosts reached by {result['machine']['sandbox']}, " in text
    assert "**4.33×**" in text and "**3.12×**" in text
    assert "ratios run by run: pull 4.00, 2.00, 5.00; push 3.57, 2.50, 3.00" in text
    assert "drydock push 0.31 s 1% 0%, 0.48 s 18% 9%, 0.30 s 0% 0%" in text
    assert result["snapshot_ratio"] == 2.4 and result["snapshot_database_s"] == 0.03
    assert "| … of which its database work (the lock, the checks, the renames) | 0.03 | 0.06× |" in text
    # No restore's journal said: the report still stands.
    bench.samples["snapshot restore"] = [{**s, "database_s": None} for s in bench.samples["snapshot restore"]]
    assert bench.report(db_bytes=10**9, seed_s=0, settle_s=0, runs=3, elapsed_s=600)["snapshot_database_s"] is None


def test_a_run_starts_only_if_a_slower_one_would_still_end_within_the_budget():
    import time

    bench = Bench("bench", runs=3, minutes=20, say=lambda _line: None)
    ten_minutes_ago = time.monotonic() - 600
    assert bench.another_run_fits(ten_minutes_ago, longest_run_s=450)  # 7.5 min, 25% slower: 19.6 min
    assert not bench.another_run_fits(ten_minutes_ago, longest_run_s=480)  # 8 min: 20.25 min
    assert Bench("bench", runs=3, minutes=0).another_run_fits(ten_minutes_ago, longest_run_s=10_000)  # no budget


def test_a_measured_step_times_only_the_step_and_probes_only_a_push(monkeypatch):
    """The gzip check runs before the step, not inside it; the downtime probe and the steal
    window span the step; what each records lands on the step's own sample."""
    import bench.run

    events = []

    class Window:
        def __init__(self, name: str, **result):
            self.name, self.result = name, result

        def __enter__(self):
            events.append(f"{self.name} on")
            return self

        def __exit__(self, *exc):
            events.append(f"{self.name} off")
            self.__dict__.update(self.result)

    def gzip_check():
        events.append("gzip check")
        return 0.2

    monkeypatch.setattr(bench.run, "gzip_check_s", gzip_check)
    monkeypatch.setattr(bench.run, "StolenCpu", lambda: Window("steal", percent=4.0, iowait_percent=9.0))
    bench_ = Bench("bench", runs=1, minutes=0, say=lambda _line: None)
    monkeypatch.setattr(bench_, "staging_probe", lambda: Window("probe", longest_gap_s=0.12))
    monkeypatch.setattr(bench_, "app_probe", lambda: Window("app probe", longest_gap_s=6.5))

    def step(seconds: float):
        def action():
            events.append("step")
            return {"seconds": seconds}
        return action

    bench_.measure("drydock push", step(70.0), probe=True)
    assert events == ["gzip check", "steal on", "probe on", "app probe on", "step", "app probe off", "probe off",
                      "steal off"]
    assert bench_.samples["drydock push"] == [{"seconds": 70.0, "downtime_s": 0.12, "app_downtime_s": 6.5,
                                              "steal_pct": 4.0, "iowait_pct": 9.0, "gzip_check_s": 0.2}]
    events.clear()
    bench_.measure("drydock pull", step(50.0))
    assert events == ["gzip check", "steal on", "step", "steal off"]
    assert "downtime_s" not in bench_.samples["drydock pull"][0]


def test_the_result_says_how_the_hosts_were_reached(tmp_path):
    bench = Bench("bench", runs=1, minutes=0, say=lambda _line: None)
    bench.sandbox = SimpleNamespace(root=tmp_path)
    assert bench.reach() == "unknown"  # no sandbox
    (tmp_path / "connection.json").write_text(json.dumps({"connection": "ssh", "become_method": "ansible.builtin.sudo"}))
    assert bench.reach() == "ssh connections, become by sudo"


def test_each_side_pushes_the_local_database_it_has_just_pulled():
    """The runbook's psql restore leaves pglz TOAST, drydock's lz4, and pg_dump reads them at
    different speeds: a push must dump its own side's pull, never the other's."""
    done = []
    bench = Bench("bench", runs=3, minutes=0, say=lambda _line: None)
    bench.quiet = SimpleNamespace(settle=lambda *vacuumed: done.append(("settle", *vacuumed)) or 0.0)
    bench.inv = lambda *args: done.append(("drydock", *args)) or {}
    bench.measure = lambda name, action, probe=False: action()
    runbook = SimpleNamespace(pull=lambda source, target: done.append(("runbook pull", source, target)),
                              push=lambda source, target: done.append(("runbook push", source, target)))
    side = {"drydock": [("settle",), ("drydock", "pull", "production"), ("settle", "local"),
                        ("drydock", "push", "staging")],
            "runbook": [("settle",), ("runbook pull", "production", "local"), ("settle", "local"),
                        ("runbook push", "local", "staging")]}
    bench.pull_and_push(runbook, drydock_first=False)
    assert done == side["runbook"] + side["drydock"]
    done.clear()
    bench.pull_and_push(runbook, drydock_first=True)
    assert done == side["drydock"] + side["runbook"]


def test_the_app_probe_measures_the_longest_time_the_site_did_not_answer_200():
    """A real HTTP server on loopback that answers 503 for a second, then 200 again."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench.probe import AppProbe

    down_until = [0.0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if time.monotonic() < down_until[0] else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with AppProbe(f"http://127.0.0.1:{server.server_address[1]}/healthz") as probe:
            time.sleep(0.3)
            down_until[0] = time.monotonic() + 1.0
            time.sleep(1.5)
        assert 1.0 <= probe.longest_gap_s < 1.0 + 2 * probe.interval_s + 0.2, probe.longest_gap_s
        assert probe.failures >= 3 and probe.successes >= 2
    finally:
        server.shutdown()
        server.server_close()


def test_the_memory_counts_ssh_masters_connected_to_the_sandbox_and_no_others():
    """Ansible's SSH masters (ControlPersist) detach from the command's tree: the sampler
    finds them by their title and the address they are connected to. Real processes, named
    as OpenSSH names a master, each holding a TCP connection."""
    listeners = [socket.create_server((address, 0)) for address in ("127.0.0.1", "127.0.0.2")]
    processes = []
    try:
        def started(title: str, listener) -> subprocess.Popen:
            address, port = listener.getsockname()
            proc = subprocess.Popen(["bash", "-c", f'exec -a "{title}" bash -c "exec 3<>/dev/tcp/{address}/{port}; '
                                                   f'echo connected; read -t 60"'],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            processes.append(proc)
            assert proc.stdout.readline() == "connected\n"
            return proc

        ours = started("ssh: /root/.ansible/cp/0123456789 [mux]", listeners[0])
        elsewhere = started("ssh: /root/.ansible/cp/abcdefabcd [mux]", listeners[1])
        not_a_master = started("ssh -o ControlMaster=auto 127.0.0.1", listeners[0])
        pids = {proc.pid for proc in processes}
        assert ssh_masters(pids, {"127.0.0.1"}) == {ours.pid}
        assert ssh_masters(pids, {"127.0.0.1", "127.0.0.2"}) == {ours.pid, elsewhere.pid}
        assert not_a_master.pid not in ssh_masters(pids, {"127.0.0.1"})
    finally:
        for proc in processes:
            proc.kill()
            proc.wait()
        for listener in listeners:
            listener.close()


def test_a_stopped_bench_lets_the_command_it_runs_stop_as_on_ctrl_c_and_shows_its_last_line(monkeypatch):
    """Stopped, the bench passes the command one SIGINT and waits while it stops and says
    what it left (drydock writes that to the bench's pipe), even when Ctrl-C is pressed again:
    leaving at once broke those lines and could cut the command's clean-up short."""
    import os
    import signal
    import sys
    import threading

    import pytest

    import bench.run

    # A command that, interrupted, takes a moment to clean up, then says so.
    command = ("import signal, sys, time\n"
               "def stop(*_):\n"
               "    time.sleep(1)\n"
               "    print('the swap did not run: staging runs the database it ran before', flush=True)\n"
               "    sys.exit(130)\n"
               "signal.signal(signal.SIGINT, stop)\n"
               "print('started', flush=True)\n"
               "time.sleep(60)\n")
    monkeypatch.setattr(bench.run, "command", lambda root: [sys.executable, "-c", command])
    said = []
    bench_ = Bench("bench", runs=1, minutes=0, say=said.append)
    monkeypatch.setattr(bench_, "sshd_pids", set)
    monkeypatch.setattr(bench_, "host_addresses", set)
    # Ctrl-C, as it reaches the bench alone; pressed again while the command cleans up.
    presses = [threading.Timer(at, os.kill, (os.getpid(), signal.SIGINT)) for at in (1.0, 1.5)]
    for press in presses:
        press.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            bench_.inv("push", "staging")
    finally:
        for press in presses:
            press.cancel()
    assert said == ["    inv push staging interrupted: waiting for it to stop (it may restart an app)",
                    "    inv push staging, interrupted: the swap did not run: staging runs the database it ran before"]
