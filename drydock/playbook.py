"""Run one of drydock's playbooks, streaming Ansible's output, and turn a failure into
the one line that says what went wrong (recorded by callback_plugins/drydock_failures)."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from drydock.errors import DrydockError, HostUnreachable
from drydock.journal import Run, json_lines
from drydock.leftovers import stop_left_running
from drydock.paths import project_root, runs_dir


DRYDOCK_CALLBACKS = ("drydock_failures", "drydock_progress", "drydock_workers",  # callback_plugins/, enabled in ansible.cfg
                     "drydock_module_cache")


def ansible_env(run: Run | None = None) -> dict[str, str]:
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8",
               ANSIBLE_CONFIG=str(project_root() / "ansible.cfg"))
    if os.environ.get("DRYDOCK_INVENTORY"):  # a real inventory instead of the sandbox's
        env["ANSIBLE_INVENTORY"] = str((project_root() / os.environ["DRYDOCK_INVENTORY"]).resolve())
    # ANSIBLE_CALLBACKS_ENABLED (e.g. profile_tasks) replaces ansible.cfg's list: keep drydock's
    # own in it, or failures lose their one line and an interrupted swap its record.
    if os.environ.get("ANSIBLE_CALLBACKS_ENABLED"):
        enabled = [name.strip() for name in os.environ["ANSIBLE_CALLBACKS_ENABLED"].split(",") if name.strip()]
        env["ANSIBLE_CALLBACKS_ENABLED"] = ",".join(enabled + [name for name in DRYDOCK_CALLBACKS if name not in enabled])
    # Where callback_plugins/drydock_module_cache keeps the module payloads Ansible builds, and
    # the folder db_verify keeps its reference schemas under (as drydock reads DRYDOCK_RUNS).
    env["DRYDOCK_MODULE_CACHE"] = str(runs_dir() / "cache" / "ansible-modules")
    env["DRYDOCK_RUNS"] = str(runs_dir())
    if run is not None:
        env["ANSIBLE_LOG_PATH"] = str(run.ansible_log)
        env["DRYDOCK_PROGRESS_FILE"] = str(run.progress_file)
    return env


def sandbox_inventory_only(say=print) -> None:
    """The demo, the tests and the bench run on the sandbox alone. A real inventory named in
    the environment would aim them at real servers, whose host names (production, staging)
    are the sandbox's: set it aside for this process and the ones it starts."""
    for name in ("DRYDOCK_INVENTORY", "ANSIBLE_INVENTORY"):
        value = os.environ.pop(name, None)
        if value:
            say(f"{name}={value} is set aside: this runs on the sandbox only")


def run_playbook(name: str, *, limit: str | None = None, extra_vars: dict | None = None,
                 run: Run | None = None, capture: bool = False) -> dict | None:
    """Run a playbook. With `capture`, Ansible's output is its JSON result, returned
    (host -> task name -> result) instead of shown."""
    playbook = project_root() / "playbooks" / name
    # In the run's private folder when there is one: a run killed (SIGKILL) leaves its scratch
    # where `inv runs.show` points, not loose in /tmp.
    in_run = {"prefix": "scratch-", "dir": run.folder()} if run else {"prefix": "drydock-"}
    with tempfile.TemporaryDirectory(**in_run) as scratch:
        failures = Path(scratch) / "failures.jsonl"
        command = ["ansible-playbook", str(playbook)]
        if limit:
            command += ["--limit", limit]
        if extra_vars:
            # A file, not the command line: values never show in the process list.
            vars_file = Path(scratch) / "vars.json"
            # 0600 like every file of a run: a run killed (SIGKILL) leaves it behind.
            with os.fdopen(os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(json.dumps(_untrusted(extra_vars)))
            command += ["--extra-vars", f"@{vars_file}"]
        env = ansible_env(run)
        env["DRYDOCK_FAILURES_FILE"] = str(failures)
        workers = Path(scratch) / "workers.txt"
        env["DRYDOCK_WORKERS_FILE"] = str(workers)
        # Ansible's own temporary folder too: a killed ansible-playbook leaves it, which in
        # ~/.ansible/tmp nothing would ever remove (the module payloads it builds are kept
        # apart, see callback_plugins/drydock_module_cache.py).
        env["ANSIBLE_LOCAL_TEMP"] = str(Path(scratch) / "ansible")
        if capture:
            env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.posix.json"
            # With ANSIBLE_VERBOSITY set, Ansible writes its own lines to stdout too, into the JSON.
            env["ANSIBLE_VERBOSE_TO_STDERR"] = "True"
        stdout, returncode = _run_terminable(command, env, capture, workers)
        if returncode != 0:
            line, unreachable = _last_failure(failures) or (f"{name} failed (exit {returncode})", False)
            raise HostUnreachable(line) if unreachable else DrydockError(line)
    if capture:
        try:
            return _task_results(json.loads(stdout))
        except ValueError as error:
            raise DrydockError(f"{name}: Ansible's output is not the JSON expected ({error})") from None
    return None


def _untrusted(value):
    """Mark every string of the extra variables as data, never a template. Ansible renders
    a string from -e as Jinja when a task uses it: a dump's file name, a notebook parameter or
    a Site name holding `{{ lookup('pipe', ...) }}` would run a command on this machine."""
    if isinstance(value, str):
        return {"__ansible_unsafe": value}
    if isinstance(value, dict):
        return {key: _untrusted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_untrusted(item) for item in value]
    return value


def _run_terminable(command: list[str], env: dict, capture: bool, workers: Path) -> tuple[str | None, int]:
    """Run ansible-playbook so that it stops *with* drydock, whatever stops drydock.

    Ansible stops cleanly only on SIGTERM or SIGINT: it passes the signal to its workers,
    each of which ends its own process group (the module it runs, pg_restore, ssh). A
    SIGKILL of ansible-playbook would leave the workers finishing their task unattended.
    So ansible-playbook runs in a session of its own, out of reach of a signal to drydock's
    process group, and gets SIGTERM from the kernel when drydock dies (even by SIGKILL) or
    from here when drydock is interrupted. What a task that did not finish left running (if
    ansible-playbook itself is killed: the whole task) is stopped here (drydock.leftovers),
    before the caller goes on and releases its lock."""
    proc = subprocess.Popen(command, env=env, cwd=project_root(), text=True, start_new_session=True,
                            preexec_fn=_die_with_parent, stdout=subprocess.PIPE if capture else None)
    # Without a terminal (a session of its own), Ansible cannot prompt: hosts' SSH keys must
    # be known beforehand and become must not ask for a password (docs/configuration.md).
    try:
        stdout, _ = proc.communicate()
    except BaseException:
        proc.terminate()
        _wait_for_exit(proc)
        # A module still cleaning up, a kernel outside its task's process group, or all of a
        # task after the kill on timeout.
        stop_left_running(workers, say=_say)
        raise
    if proc.returncode != 0:
        # Killed by a signal, which Ansible never passes on to its workers; or a worker was
        # (Ansible then fails the run, and that worker's task runs on).
        stop_left_running(workers, say=_say)
    return stdout, proc.returncode


def _say(line: str) -> None:
    print(line, flush=True)


def _wait_for_exit(proc: subprocess.Popen, seconds: float = 60) -> None:
    """Wait for a terminated ansible-playbook to stop its workers and exit, and kill it after
    `seconds`. A second Ctrl-C meanwhile does not cut the wait short: drydock would go on (to
    say what the run left, or start the app again) while a task still ran."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def _task_results(output: dict) -> dict:
    results: dict = {}
    for play in output.get("plays", []):
        for task in play.get("tasks", []):
            for host, result in task.get("hosts", {}).items():
                results.setdefault(host, {})[task["task"]["name"]] = result
    return results


def _die_with_parent() -> None:
    """In the child: get SIGTERM when drydock dies, so that no playbook outlives its lock."""
    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # drydock died before the request took effect
        os._exit(1)


def _last_failure(path: Path) -> tuple[str, bool] | None:
    """The last failure drydock_failures recorded, as one line, and whether its host did not
    answer (then the line names the task it was at: Ansible's message does not)."""
    if not path.exists():
        return None
    entries = json_lines(path.read_text().splitlines())
    if not entries:
        return None
    last = entries[-1]
    where = f"{last['host']} (on {last['delegated_to']})" if last.get("delegated_to") else last["host"]
    if last.get("kind") == "unreachable":
        task = last["task"].split(" : ", 1)[-1]  # without its role
        msg = last["msg"].removeprefix("Task failed: ")  # Ansible's prefix to every unreachable's message
        return f"{where}: the host did not answer during the task \"{task}\": {msg}", True
    return f"{where}: {last['msg']}", False
