"""Pure helpers: row-count comparison, the journal's privacy, dump selection."""
import json
import os
import stat
import sys

import pytest

from drydock import dumps
from drydock.errors import DrydockError
from drydock.journal import Run, read as read_journal
from drydock_pg import (count_differences, describe_origin, dumped_code, pg_restore_error, row_count_problem,
                        tables_without_rows)


def test_count_differences_names_each_table():
    assert count_differences({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert count_differences({"a": 1, "b": 2, "c": 3}, {"a": 2, "b": 2, "d": 0}) == [
        "a: 2 rows, expected 1", "c: missing", "d: not in the manifest"]


def test_row_count_problem_is_one_line_naming_the_first_five_tables():
    expected = {f"t{i}": "3" for i in range(7)}  # a manifest's counts may arrive as strings
    assert row_count_problem("db__incoming", expected, {f"t{i}": 3 for i in range(7)}) is None
    problem = row_count_problem("db__incoming", expected, {f"t{i}": 4 for i in range(7)})
    assert problem.startswith("row counts of db__incoming differ from the manifest: ")
    assert "\n" not in problem and "t4" in problem and "t5" not in problem and problem.endswith("and 2 more")


# A table of contents as pg_restore --list prints it: the dump's own code among its tables.
TOC = """;
; Archive created at 2026-12-07 09:03:23 UTC
214; 1259 16385 TABLE public blog_post wagtail_site
262; 1255 16491 FUNCTION public planted_ok(integer, text) wagtail_site
263; 1255 16492 AGGREGATE public planted_sum(integer) wagtail_site
3346; 2618 16395 RULE public wagtailcore_site keep copy wagtail_site
3350; 2620 16401 TRIGGER public wagtailcore_site planted wagtail_site
3348; 0 16385 TABLE DATA public blog_post wagtail_site
3351; 2606 16402 FK CONSTRAINT public blog_post blog_post_page_fk wagtail_site
"""


def test_the_dumps_own_code_is_told_by_its_catalog_not_its_words():
    assert dumped_code(TOC) == ["public.planted_ok(integer,text)", "public.planted_sum(integer)",
                                "rule keep copy on public.wagtailcore_site", "trigger planted on public.wagtailcore_site"]
    assert dumped_code(TOC.replace("2618", "1259").replace("2620", "1259").replace("1255", "1259")) == []


def test_a_table_whose_rows_the_dump_does_not_list_is_named():
    toc = TOC + "3349; 0 16410 TABLE DATA my schema odd table my role\n"
    tables = {16385: "blog_post", 16410: "my schema.odd table", 16420: "planted_hidden"}
    assert tables_without_rows(toc, tables) == ["planted_hidden"]


def test_pg_restore_error_is_the_error_line_not_the_failed_sql():
    stderr = ("pg_restore: while PROCESSING TOC:\n"
              "pg_restore: error: could not execute query: ERROR:  permission denied for schema public\n"
              "Command was: CREATE TABLE public.blog_post (\n    id integer NOT NULL\n);\n\n")
    assert pg_restore_error(stderr, 1) == ("pg_restore: error: could not execute query: "
                                           "ERROR:  permission denied for schema public")
    worker = ("pg_restore: error: could not execute query: ERROR:  could not extend file: No space left on device\n"
              "Command was: COPY public.blog_post (id, body) FROM stdin;\n"
              "pg_restore: error: a worker process died unexpectedly\n")
    assert pg_restore_error(worker, 1).endswith("No space left on device")
    assert pg_restore_error("pg_restore: error: a worker process died unexpectedly\n", 1).endswith("died unexpectedly")
    assert pg_restore_error("starting\nkilled\n", -9) == "killed"
    assert pg_restore_error("", 1) == "pg_restore exited with 1"


@pytest.fixture
def permissive_umask():
    """umask 022, as most shells have it: a file or folder left to the umask shows as 0644 or 0755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_journal_is_private_and_records_failures(tmp_path, permissive_umask):
    run = Run("example", root=tmp_path)
    with run.step("fine", bytes=3):
        pass
    with pytest.raises(RuntimeError), run.step("broken"):
        raise RuntimeError("it broke\nsecond line")
    assert stat.S_IMODE(run.dir.stat().st_mode) == 0o700
    journal = run.dir / "journal.jsonl"
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    # Made before Ansible appends to it (Ansible would create it by the umask): it can show production data.
    assert stat.S_IMODE(run.ansible_log.stat().st_mode) == 0o600
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(e["step"], e["outcome"]) for e in entries] == [
        ("fine", "running"), ("fine", "ok"), ("broken", "running"), ("broken", "failed")]
    assert [(s["step"], s["outcome"]) for s in read_journal(run.dir)] == [("fine", "ok"), ("broken", "failed")]
    assert entries[3]["error"] == "it broke"


def test_a_line_cut_short_is_left_out_of_the_journal_and_the_failure_record(tmp_path):
    """A kill, or a disk that filled up, mid-line: `inv runs.list` and `runs.show` still read
    the run, and a failed playbook is still told by its last whole failure line."""
    from drydock.playbook import _last_failure

    run = Run("example", root=tmp_path)
    with pytest.raises(RuntimeError), run.step("broken"):
        raise RuntimeError("it broke")
    with open(run.dir / "journal.jsonl", "a") as journal:
        journal.write('{"step": "restore", "start": "2026-12')
    assert [(s["step"], s["outcome"], s["error"]) for s in read_journal(run.dir)] == [("broken", "failed", "it broke")]
    failures = tmp_path / "failures.jsonl"
    failures.write_text(json.dumps({"host": "staging", "msg": "no room", "task": "t"}) + '\n{"host": "stag')
    assert _last_failure(failures) == ("staging: no room", False)


def test_runs_show_takes_a_runs_folder_as_a_shell_completes_it(tmp_path, monkeypatch):
    from drydock.validate import InvalidInput
    from drydock.workflow import runs_show

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path / "runs"))
    run = Run("example", root=tmp_path / "runs")
    with run.step("fine"):
        pass
    monkeypatch.chdir(tmp_path)
    for given in (run.dir.name, f"runs/{run.dir.name}/", str(run.dir)):
        assert [s["step"] for s in runs_show(given, say=lambda line: None)] == ["fine"], given
    for elsewhere in ("runs/..", f"other/{run.dir.name}", "/etc/passwd"):
        with pytest.raises(InvalidInput):
            runs_show(elsewhere, say=lambda line: None)


def test_the_backup_folder_the_playbooks_make_is_private_and_never_one_every_user_may_write_to(tmp_path):
    """What plain ansible-playbook does with pg_backup_controller_dir: `./inv` refuses such a
    folder before (drydock.paths), the fetch again."""
    import importlib.util

    from ansible.errors import AnsibleError
    from drydock.paths import project_root

    spec = importlib.util.spec_from_file_location("drydock_fetch", project_root() / "action_plugins" / "drydock_fetch.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    new, shared = tmp_path / "backups", tmp_path / "shared"
    fetch.make_private_folders(str(new), str(new / "production" / "20261207T120000Z"))
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in (new, new / "production", new / "production" / "20261207T120000Z")} == {"0o700"}
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(AnsibleError, match="one every user may write to"):
        fetch.make_private_folders(str(shared), str(shared / "production" / "20261207T120000Z"))
    assert (oct(stat.S_IMODE(shared.stat().st_mode)), list(shared.iterdir())) == ("0o1777", [])


def test_a_manifest_kept_in_the_run_folder_is_private(tmp_path, permissive_umask):
    """The copy of a backup's manifest a run keeps names production's tables and row counts:
    0600, made so or over a copy left readable to others."""
    from drydock.workflow import _keep_artifact

    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"row_counts": {"blog_post": 220}}')
    run = Run("backup", root=tmp_path / "runs")
    kept = run.folder() / "manifest-production.json"
    for left_before in (None, 0o644):
        if left_before:
            kept.chmod(left_before)
        _keep_artifact(run, manifest, kept.name)
        assert (oct(stat.S_IMODE(kept.stat().st_mode)), kept.read_text()) == ("0o600", manifest.read_text())


def test_the_runs_folder_is_made_private_only_when_it_is_ours(tmp_path):
    """runs/ made by hand with the umask's mode becomes 0700; a folder another user made for
    us (DRYDOCK_RUNS) is theirs to set: changing it would fail unless we are root."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(mode=0o755)
    theirs.mkdir(mode=0o755)
    with Run("example", root=ours).step("fine"):
        pass
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700
    if os.geteuid() == 0:  # only root can hand a folder to another user
        os.chown(theirs, 65534, 65534)
        with Run("example", root=theirs).step("fine"):
            pass
        assert stat.S_IMODE(theirs.stat().st_mode) == 0o755


def test_a_run_killed_in_a_step_reads_as_killed_there(tmp_path):
    """SIGKILL leaves no end line: the journal must not call the run ok."""
    import subprocess
    import sys

    from drydock.journal import list_runs

    script = ("import sys, time; from pathlib import Path; from drydock.journal import Run\n"
              "run = Run('push', root=Path(sys.argv[1]))\n"
              "with run.step('dump local'):\n    pass\n"
              "with run.step('restore'):\n    print('in', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "in\n"
    assert (list_runs(tmp_path)[0]["outcome"], list_runs(tmp_path)[0]["seconds"]) == ("running", "")
    child.kill()
    child.wait()
    (run,) = list_runs(tmp_path)
    assert run["outcome"] == "killed" and run["failed_step"] == "restore"
    assert run["seconds"] == ""  # how long it ran is unknown: not the finished steps' 0.0
    assert "the run ended during restore without finishing it" in run["error"]


def test_an_interrupted_step_says_what_it_left_and_a_refused_command_leaves_no_run(tmp_path):
    run = Run("pull", root=tmp_path)
    assert not run.dir.exists()  # made with the first step: a command refused before it leaves nothing
    with pytest.raises(DrydockError, match=r"\Ainterrupted during pull: the local database is whole\Z"):
        with run.step("pull", interrupted="the local database is whole"):
            raise KeyboardInterrupt
    (entry,) = read_journal(run.dir)
    assert entry["outcome"] == "interrupted" and entry["error"] == "interrupted during pull: the local database is whole"


def test_the_run_list_names_the_environments_in_order_and_an_interrupted_run(tmp_path):
    from drydock.journal import list_runs

    run = Run("pipeline", root=tmp_path, route=["production", "local", "staging"])
    for name, env in (("backup", "production"), ("pull", "local"), ("migrate", "local"), ("restore", "staging")):
        with run.step(name, env=env):
            pass
    older = Run("push", root=tmp_path)  # a run from before routes were recorded: its steps' environments
    for name, env in (("dump local", "local"), ("restore", "staging")):
        with older.step(name, env=env):
            pass
    interrupted = Run("push", root=tmp_path, route=["local", "staging"])
    with pytest.raises(DrydockError):
        with interrupted.step("dump local", env="local", interrupted="nothing changed"):
            raise KeyboardInterrupt
    pipeline, older, push = list_runs(tmp_path)
    assert (pipeline["envs"], pipeline["outcome"], pipeline["failed_step"]) == ("production→local→staging", "ok", "")
    assert older["envs"] == "local→staging"
    # Ended before it reached staging, it still names it: where it was going is what it was.
    assert (push["envs"], push["outcome"], push["failed_step"]) == ("local→staging", "interrupted", "dump local")


def test_the_run_list_names_the_first_step_that_failed(tmp_path):
    """A verify that failed, then the rollback after it that failed too: the run failed at the
    verify, and that is the step and error its line gives."""
    from drydock.journal import list_runs

    run = Run("push", root=tmp_path)
    with run.step("restore", env="staging"):
        pass
    for name in ("verify staging", "rollback"):
        with pytest.raises(RuntimeError), run.step(name, env="staging"):
            raise RuntimeError(f"{name} broke")
    (listed,) = list_runs(tmp_path)
    assert (listed["outcome"], listed["failed_step"], listed["error"]) == ("failed", "verify staging",
                                                                          "verify staging broke")


def test_the_run_list_shows_the_newest_runs_and_says_how_many_it_left_out(tmp_path, monkeypatch):
    from drydock.validate import InvalidInput
    from drydock.workflow import runs_list

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path))
    for task in ("backup", "pull", "push"):
        with Run(task, root=tmp_path).step(task):
            pass
    said = []
    assert [r["task"] for r in runs_list(last="2", say=said.append)] == ["pull", "push"]
    assert said[0] == "1 older run not shown (--last 0 lists them all)" and said[1].splitlines()[-1].split()[1] == "push"
    assert [r["task"] for r in runs_list(last=0, say=said.append)] == ["backup", "pull", "push"]
    for bad in ("-1", "all"):
        with pytest.raises(InvalidInput, match="invalid --last"):
            runs_list(last=bad, say=said.append)


def test_an_interrupted_migration_step_says_what_it_left_by_its_mark(tmp_path, monkeypatch):
    """The mark (there from the safety snapshot until the database is whole again) decides;
    the progress Ansible reported tells a step stopped before it from one that ended."""
    from drydock import unfinished
    from drydock.workflow import MIGRATE_MARK_TASK, _migrate_interrupted

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path))

    def left(*, mark: dict | None = None, marked: bool | None = None, log: str = "TASK [x]") -> str:
        run = Run("migrate", root=tmp_path)
        run.folder()
        run.ansible_log.write_text(log)
        if marked is not None:
            events = [{"event": event, "host": "local", "action": "ansible.builtin.copy", "task": MIGRATE_MARK_TASK}
                      for event in (("start", "ok") if marked else ("start",))]
            run.progress_file.write_text("".join(json.dumps(event) + "\n" for event in events))
        unfinished.path().unlink(missing_ok=True)
        if mark is not None:
            unfinished.path().parent.mkdir(parents=True, exist_ok=True)
            unfinished.path().write_text(json.dumps(mark))
        return _migrate_interrupted(run, "local", "before_step")

    assert left(mark={"run": "r", "snapshot": "own_name"}, marked=True) == (
        "the local database may be half-changed: put it back with `inv snapshot.restore own_name` (or pull again); "
        "migrate, push and snapshot.save refuse until then, and verify local fails")
    assert left(marked=False) == ("the step had not begun changing the local database (its safety snapshot comes "
                                  "first): it is unchanged")
    assert left(log="") == left(marked=False)  # Ansible had not begun a task
    assert left(marked=True).startswith("the step had ended, or put the local database back, before the interruption")
    # Tasks ran, but nothing was recorded (the callback left out): only the mark can be read.
    assert left().startswith("the local database is whole: the step had not begun changing it, or had ended")


def test_an_interrupted_step_in_a_pipeline_says_its_pull_had_replaced_the_local_database(tmp_path):
    from drydock.workflow import _pulled_before

    run = Run("pipeline", root=tmp_path)
    with run.step("backup"):
        pass
    assert _pulled_before(run) == ""
    with run.step("pull"):
        pass
    assert _pulled_before(run) == ("; the pipeline's pull before it had replaced the local database (snapshot pre_pull"
                                   " holds the one from before the pipeline)")


def test_an_interrupted_verify_in_a_pipeline_says_what_its_push_had_put_live(tmp_path):
    from drydock.workflow import _changed_before

    run = Run("pipeline", root=tmp_path)
    with run.step("pull", env="local"):
        pass
    assert _changed_before(run, "local").startswith("; the pipeline's pull before it had replaced the local database")
    assert _changed_before(run, "staging") == _changed_before(run, "local")  # no push yet
    with run.step("restore", env="staging"):
        pass
    assert _changed_before(run, "staging") == ("; the pipeline's push before it had put its copy live on staging,"
                                               " unchecked: inv verify staging, and inv rollback staging if that fails")


def test_a_push_whose_host_stopped_answering_says_what_it_left_and_tries_nothing_there(tmp_path):
    """The playbook's rescue does not run for a host that does not answer: the push's line
    says what the tasks' progress tells, and no restart of the app is tried over the
    connection that failed (say=pytest.fail: nothing is started)."""
    from drydock.dumps import Dump
    from drydock.errors import HostUnreachable
    from drydock.workflow import _push_interrupted, _run_began

    pushed = Dump(tmp_path / "local" / "x.dump.zst", {"source": {"env": "local"}, "created": "20260102T000000Z"})
    lost = 'staging: the host did not answer during the task "Swap": Failed to connect to the host via ssh: reset'

    def failed_after(*events: tuple[str, str, str]) -> str:
        run = Run("push", root=tmp_path)
        run.ansible_log.write_text("TASK [Restore]\n")
        with pytest.raises(HostUnreachable) as error:
            with run.step("restore", unreachable=lambda: _push_interrupted(run, "staging", "site", pushed,
                                                                           say=pytest.fail, host_answers=False)):
                # What drydock_progress records while the step runs.
                run.progress_file.write_text("".join(json.dumps({"event": event, "host": "staging", "action": action,
                                                                 "task": task}) + "\n" for action, task, event in events))
                raise HostUnreachable(lost)
        assert read_journal(run.dir)[-1]["error"] == str(error.value)  # as `inv runs.show` gives it
        return str(error.value).replace(f"a time after {_run_began(run)}", "a time after BEGAN")

    stop = ("ansible.builtin.command", "app_service : Stop the app with its stop command")
    start = ("ansible.builtin.command", "app_service : Start the app with its start command")
    swap = ("drydock_db_swap", "Swap")
    assert failed_after((*stop, "start"), (*stop, "ok"), (*swap, "start")) == (
        f"{lost}; the swap was running: staging runs its old database or the pushed copy, and its app may be stopped; "
        "`inv verify staging` says which (the copy's live database line reads `pushed from local's dump "
        "20260102T000000Z; live since` a time after BEGAN): if it is the copy, `inv rollback staging` brings back the database from before and "
        "starts the app, or `inv app.restart staging` starts the app on the copy (a second push would drop the "
        "database from before); if not, push again")
    assert failed_after((*stop, "start")) == (
        f"{lost}; the swap did not run: staging runs its old database, and its app may be stopped: once the host "
        "answers, inv app.restart staging; the next push drops any side database left behind")
    assert failed_after((*stop, "start"), (*swap, "start"), (*swap, "ok")) == (
        f"{lost}; the swap ran: staging runs the pushed copy, its database from before is site__previous, and its app "
        "may be stopped: `inv rollback staging` brings that database back and starts the app (a second push would "
        "drop it), or `inv app.restart staging` starts the app on the pushed copy, unchecked: then "
        "`inv verify staging`")
    # Lost during the health check, once the app had started on the copy.
    assert failed_after((*stop, "start"), (*swap, "start"), (*swap, "ok"), (*start, "start"), (*start, "ok")) == (
        f"{lost}; the swap ran: staging runs the pushed copy, unchecked (stopped before its checks ended), and its app "
        "was not left stopped: `inv verify staging` checks it; its database from before is site__previous "
        "(`inv rollback staging` brings it back; a second push would drop it)")
    # Lost while the generation kept until the checks passed was dropped: the push had gone live.
    drop = ("drydock_db_swap", "Drop the generation kept until the checks passed, the one before <db>__previous")
    assert failed_after((*stop, "start"), (*swap, "start"), (*swap, "ok"), (*start, "start"), (*start, "ok"),
                        (*drop, "start")) == (
        f"{lost}; the swap ran: staging runs the pushed copy, which passed its checks, and its app was not left "
        "stopped; its database from before is site__previous (`inv rollback staging` brings it back; a second push "
        "would drop it)")


def test_a_pipeline_whose_last_verify_cannot_reach_the_target_rolls_nothing_back(tmp_path, monkeypatch):
    """No check failed, and a rollback could not reach the host either. The steps before are
    drydock's own functions, replaced here: only the pipeline's choice is under test."""
    from types import SimpleNamespace

    from drydock import inventory, workflow
    from drydock.errors import HostUnreachable

    from tests.conftest import described_inventory

    hosts = described_inventory(tmp_path, ("production", "staging"), "local",
                                drydock_app_database_url="postgresql://site@localhost/x")
    monkeypatch.setenv("DRYDOCK_INVENTORY", str(hosts))
    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path / "runs"))
    inventory.load.cache_clear()
    lost = 'staging: the host did not answer during the task "Check": Failed to connect to the host via ssh: reset'

    def verify(env: str, **_):
        if env == "staging":
            raise HostUnreachable(lost)
    pushed = SimpleNamespace(path=tmp_path / "local" / "x.dump.zst")
    for name, stand_in in {"backup": lambda *a, **k: pushed, "pull": lambda *a, **k: None,
                           "migrate": lambda *a, **k: None, "verify": verify, "push": lambda *a, **k: pushed,
                           "run_playbook": lambda *a, **k: pytest.fail("a rollback was tried")}.items():
        monkeypatch.setattr(workflow, name, stand_in)
    with pytest.raises(DrydockError) as error:
        workflow.pipeline("production", "staging", say=lambda line: None)
    inventory.load.cache_clear()
    assert str(error.value) == (f"{lost} (not rolled back: staging runs the pushed copy, unchecked; once it answers, "
                                "inv verify staging, and inv rollback staging if that fails)")


@pytest.mark.parametrize("events, error, line", [
    # A server that does not answer, before the app was touched: that is said.
    ([], "staging: no database server answers on /run (Connection refused)",
     "staging: no database server answers on /run (Connection refused) (nothing was rolled back: staging runs the"
     " database it ran before, and its app was not stopped)"),
    # The playbook's refusals say it themselves; a failure once the stop began says what it left.
    ([], "nothing to roll back to: x; the app was left running", "nothing to roll back to: x; the app was left running"),
    ([("app_service : Stop the app with its stop command", "start")], "staging: /bin/false exited with status 1 (…)",
     "staging: /bin/false exited with status 1 (…)")], ids=["server down", "refusal", "after the stop began"])
def test_a_rollback_that_failed_before_stopping_the_app_says_nothing_was_rolled_back(tmp_path, monkeypatch, events,
                                                                                   error, line):
    from drydock import inventory, workflow

    from tests.conftest import described_inventory

    monkeypatch.setenv("DRYDOCK_INVENTORY", str(described_inventory(tmp_path, ("production", "staging"), "local")))
    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path / "runs"))
    inventory.load.cache_clear()

    def failing_playbook(name, run, **_):
        run.ansible_log.write_text("TASK [Look for the previous database]\n")
        run.progress_file.write_text("".join(json.dumps({"event": event, "host": "staging", "task": task}) + "\n"
                                             for task, event in [("Look for the previous database", "start"), *events]))
        raise DrydockError(error)
    monkeypatch.setattr(workflow, "run_playbook", failing_playbook)
    try:
        with pytest.raises(DrydockError) as raised:
            workflow.rollback("staging", say=lambda said: None)
    finally:
        inventory.load.cache_clear()
    assert str(raised.value) == line


def test_an_interrupted_push_or_rollback_says_whether_its_swap_ran_from_the_progress_ansible_reported(tmp_path,
                                                                                                     monkeypatch):
    """Ansible's log shows a task's banner only with its result: which swap ran is read from
    the events drydock_progress records, per host (a pipeline's pull swaps on local)."""
    from drydock import unfinished
    from drydock.dumps import Dump
    from drydock.workflow import _pull_interrupted, _push_interrupted, _rollback_interrupted

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path))  # an unfinished step's mark: this test's own
    unfinished.path().parent.mkdir(parents=True)
    unfinished.path().write_text(json.dumps({"run": "r", "step": "migrate (all)", "pid": 0}))

    pushed = Dump(tmp_path / "local" / "x.dump.zst", {"source": {"env": "local"}, "created": "20260102T000000Z"})
    pulled = Dump(tmp_path / "production" / "y.dump.zst", {"source": {"env": "production"}, "created": "20260101T000000Z"})

    def interrupted_after(*events: tuple[str, str], recorded: bool = True, log: str = "") -> tuple[str, str, str]:
        run = Run("push", root=tmp_path)
        run.ansible_log.write_text(log)
        lines = [{"event": event, "host": host, "action": "drydock_db_swap", "task": "Swap", **dict(account)}
                 for host, event, *account in events]
        lines.insert(0, {"event": "ok", "host": "staging", "action": "drydock_pg_restore", "task": "Restore"})
        with pytest.raises(DrydockError) as push_error:
            with run.step("restore", interrupted=lambda: _push_interrupted(run, "staging", "site", pushed,
                                                                           say=pytest.fail)):
                if recorded:  # what drydock_progress records while the step runs
                    run.progress_file.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"event": "st')
                raise KeyboardInterrupt
        return (str(push_error.value), _pull_interrupted(run, "local", pulled),
                _rollback_interrupted(run, "staging", "site", say=pytest.fail))

    # No app stop recorded: nothing to start again (say=pytest.fail: nothing is started).
    push, pull, rollback = interrupted_after()
    assert push == ("interrupted during restore: the swap did not run: staging runs its old database, and its app was"
                    " not left stopped; the next push drops any side database left behind")
    assert pull.startswith("the swap did not run: the local database is unchanged")
    assert unfinished.read() is not None  # still about the local database, which the pull left as it was
    assert rollback == ("the exchange did not run: staging runs the database it ran before, and its app was not left"
                        " stopped")
    push, pull, rollback = interrupted_after(("local", "start"), ("local", "ok"), ("staging", "start"))
    assert unfinished.read() is None  # the pulled database replaced the one the step left half-changed
    assert "the swap was running" in push and ("`inv verify staging` says which (the copy's live database line reads"
                                                " `pushed from local's dump 20260102T000000Z; live since` a time after"
                                                " 20") in push
    assert pull.startswith("the swap ran: the local database is the pulled one")
    assert rollback.startswith("the exchange may have run: staging runs one of its two databases, whole")
    push, _, rollback = interrupted_after(("staging", "start"), ("staging", "ok"))
    assert push == ("interrupted during restore: the swap ran: staging runs the pushed copy, unchecked (stopped before"
                    " its checks ended), and its app was not left stopped: `inv verify staging` checks it; its database"
                    " from before is site__previous (`inv rollback staging` brings it back; a second push would drop it)")
    assert rollback == ("the exchange ran: staging now runs the database it had kept as site__previous; the one it"
                        " replaced is kept as site__previous in its place (inv rollback staging swaps them back), and"
                        " its app was not left stopped")
    # The exchange's own account of the database it put live, when it returned one.
    *_, rollback = interrupted_after(("staging", "start"), ("staging", "ok", ("account", "pushed from local's dump X")))
    assert rollback.startswith("the exchange ran: staging now runs the database it had kept as site__previous: pushed"
                               " from local's dump X; the one it replaced")
    push, *_ = interrupted_after(("staging", "start"), ("staging", "failed"))  # its transaction rolled back
    assert "the swap did not run" in push
    push, *_ = interrupted_after(("staging", "start"), ("staging", "unreachable"))
    assert "the swap was running" in push
    # A swap-back skipped by its condition is reported started, then skipped: it never ran.
    push, *_ = interrupted_after(("staging", "start"), ("staging", "skipped"))
    assert "the swap did not run" in push
    push, *_ = interrupted_after(("staging", "start"), ("staging", "ok"), ("staging", "start"), ("staging", "skipped"))
    assert "the swap ran: staging runs the pushed copy" in push
    push, _, rollback = interrupted_after(("staging", "start"), ("staging", "ok"), ("staging", "start"))
    assert "whether the swap ran cannot be told, it was being swapped back after a failed check" in push
    # A rollback swapping back: its app is not started again (say=pytest.fail) on what may be the failed database.
    assert rollback.startswith("it was swapping back after the app failed its check: staging runs one of its two")
    assert f"`inv verify staging --manifest {tmp_path / 'local' / 'manifest.json'}` passes on the pushed copy alone" in push
    # The same module dropping the generation the swap kept, once the checks passed: no swap-back.
    dropping = ("task", "Drop the generation kept until the checks passed, the one before <db>__previous")
    push, *_ = interrupted_after(("staging", "start"), ("staging", "ok"), ("staging", "start", dropping))
    assert "the swap ran: staging runs the pushed copy" in push, push
    # No progress, and no task in Ansible's log either: interrupted before the playbook's first task.
    push, pull, rollback = interrupted_after(recorded=False)
    assert "the swap did not run" in push and pull.startswith("the swap did not run")
    # No progress, but tasks in the log: the progress callback is not enabled.
    push, pull, rollback = interrupted_after(recorded=False, log="TASK [Restore] ****\nok: [staging]\n")
    assert "whether the swap ran cannot be told, no task progress was recorded" in push and "never went in" not in push
    assert pull.startswith("the swap may have run") and ("`inv verify local` says which (the pulled one's live"
                                                         " database line reads `restored from production's backup"
                                                         " 20260101T000000Z; live since` a time after 20") in pull
    assert rollback.endswith("and its app may be stopped (no task progress was recorded): restart it: inv app.restart"
                             " staging (or its unit or start command)")


def test_a_swap_onto_a_database_dropped_by_hand_says_so_and_leaves_pre_pull_and_its_mark(tmp_path, monkeypatch):
    """Its swap found no live database, so snapshot pre_pull (and <db>__previous) stayed as
    they were: pre_pull keeps the mark of the half-changed database it holds, and the lines
    do not call it the database the pull replaced."""
    from drydock import unfinished
    from drydock.dumps import Dump
    from drydock.workflow import _pull_interrupted, _pulled_over, _push_interrupted

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path))
    unfinished.path().parent.mkdir(parents=True)
    half_changed = {"run": "r", "step": "migrate (all)", "pid": 0, "kept_by_pull": True}
    unfinished.path(snapshot=unfinished.PRE_PULL).write_text(json.dumps(half_changed))
    unfinished.path().write_text(json.dumps({"run": "s", "step": "migrate (all)", "pid": 0}))  # of the dropped one

    def swapped(account: str) -> Run:
        run = Run("pull", root=tmp_path)
        run.progress_file.write_text("".join(json.dumps(line) + "\n" for line in [
            {"event": "start", "host": "local", "action": "drydock_db_swap", "task": "Swap"},
            {"event": "ok", "host": "local", "action": "drydock_db_swap", "task": "Swap", "account": account}]))
        return run

    nothing = swapped("nothing was live to set aside: site__snap_pre_pull was left as it was")
    assert _pulled_over(nothing, "local") == (False, None)
    assert unfinished.read(snapshot=unfinished.PRE_PULL) == half_changed  # still warns, once restored
    assert unfinished.read() is None  # the pulled database is whole
    pulled = Dump(tmp_path / "production" / "y.dump.zst", {"source": {"env": "production"}, "created": "2026"})
    assert _pull_interrupted(nothing, "local", pulled) == ("the swap ran: the local database is the pulled one, and"
                                                           " there was none before it to replace: snapshot pre_pull"
                                                           " was left as it was")
    on_staging = swapped("nothing was live to set aside: site__previous was left as it was")
    on_staging.progress_file.write_text(on_staging.progress_file.read_text().replace('"local"', '"staging"'))
    assert _push_interrupted(on_staging, "staging", "site", pulled, say=pytest.fail).startswith(
        "the swap ran: staging runs the pushed copy (it had no live database to replace: site__previous was left as"
        " it was), and its app may be stopped: `inv app.restart staging` starts it")
    # A swap that set a database aside: the usual account, and the mark goes with it into pre_pull.
    unfinished.path().write_text(json.dumps({"run": "t", "step": "migrate (all)", "pid": 0}))
    replaced, mark = _pulled_over(swapped("site was set aside as site__snap_pre_pull"), "local")
    assert replaced and mark["run"] == "t" and unfinished.read(snapshot=unfinished.PRE_PULL)["run"] == "t"


def test_an_app_counts_as_stopped_from_a_stop_that_began_until_a_start_that_ended_well(tmp_path):
    from drydock.workflow import _app_may_be_stopped

    stop, start = "app_service : Stop the app with its stop command", "app_service : Start the app with its start command"

    def stopped(*events: tuple[str, str], host: str = "staging") -> bool | None:
        run = Run("push", root=tmp_path)
        lines = [{"event": event, "host": host, "action": "ansible.builtin.command", "task": task}
                 for task, event in events]
        run.progress_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return _app_may_be_stopped(run, "staging")

    assert stopped() is False
    assert stopped((stop, "start")) is True  # interrupted while it stopped: it may be down
    assert stopped((stop, "start"), (stop, "skipped")) is False  # no stop command configured
    assert stopped((stop, "start"), (stop, "ok"), (start, "start")) is True  # its start never ended
    assert stopped((stop, "start"), (stop, "ok"), (start, "start"), (start, "failed")) is True
    assert stopped((stop, "start"), (stop, "ok"), (start, "start"), (start, "ok")) is False
    assert stopped((stop, "start"), (stop, "ok"), (start, "start"), (start, "ok"), (stop, "start")) is True  # a rescue
    assert stopped((stop, "start"), host="production") is False  # another host's app
    assert _app_may_be_stopped(Run("push", root=tmp_path), "staging") is False  # no task had begun
    untracked = Run("push", root=tmp_path / "untracked")
    untracked.ansible_log.write_text("TASK [app_service : Stop the app] ****\n")
    assert _app_may_be_stopped(untracked, "staging") is None  # tasks ran, their progress was not recorded


def test_the_app_task_names_drydock_looks_for_are_the_app_service_role_s(tmp_path):
    """Renamed in the role, a stop would go unseen and an interrupted push leave the app down."""
    import yaml

    from drydock.paths import project_root
    from drydock.workflow import APP_START_TASKS, APP_STOP_TASKS

    tasks = project_root() / "roles" / "app_service" / "tasks"
    for file, prefix in (("stop.yml", APP_STOP_TASKS), ("start.yml", APP_START_TASKS)):
        names = [f"app_service : {task['name']}" for task in yaml.safe_load((tasks / file).read_text())]
        assert names and all(name.startswith(prefix) for name in names), (file, names)
    others = [task["name"] for path in tasks.glob("*.yml") if path.name not in ("stop.yml", "start.yml")
              for task in yaml.safe_load(path.read_text())]
    assert not [name for name in others if f"app_service : {name}".startswith((APP_STOP_TASKS, APP_START_TASKS))]


def test_a_second_ctrl_c_does_not_cut_short_the_wait_for_ansible_to_stop():
    """drydock must not go on (say what was left, start the app) while a task still runs."""
    import signal
    import subprocess
    import sys
    import time

    from drydock.playbook import _wait_for_exit

    # Like ansible-playbook: stops its workers on SIGTERM, which takes a moment.
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                             "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), sys.exit(3)))\n"
                             "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"

    def second_ctrl_c(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, second_ctrl_c)
    try:
        proc.terminate()
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            _wait_for_exit(proc)
        except KeyboardInterrupt:  # not left to pytest, which would end the whole session
            pytest.fail("the second Ctrl-C cut the wait short")
        assert proc.returncode == 3 and time.monotonic() - started >= 0.9
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        proc.kill()
        proc.wait()


def test_an_interrupted_step_whose_account_fails_still_ends_in_one_line(tmp_path):
    run = Run("push", root=tmp_path)

    def broken() -> str:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(DrydockError, match=r"\Ainterrupted during restore: what it left could not be told \("):
        with run.step("restore", interrupted=broken):
            raise KeyboardInterrupt

    def interrupted_again() -> str:
        raise KeyboardInterrupt

    with pytest.raises(DrydockError, match=r"\Ainterrupted during restore: what it left could not be told \(interrupted"
                                           r" again\)\Z"):
        with run.step("restore", interrupted=interrupted_again):
            raise KeyboardInterrupt


def test_ctrl_c_fails_the_command_in_one_line_with_the_status_of_sigint():
    """Interrupted, before a step began or during one, a command fails with drydock's one
    line rather than a traceback, and status 130 (128 + SIGINT, what a shell reports for a
    command Ctrl-C stopped), which a script can tell from a failed check's 1."""
    from invoke import Exit

    from drydock.errors import DrydockError, Interrupted
    from tasks import one_line_errors

    @one_line_errors
    def command(c, raised):
        raise raised

    outcomes = {}
    for raised in (KeyboardInterrupt(), Interrupted("interrupted during restore: the swap did not run"),
                   DrydockError("staging: the check failed")):
        with pytest.raises(Exit) as exited:
            command(None, raised)
        outcomes[type(raised).__name__] = (exited.value.code, exited.value.message)
    assert outcomes == {
        "KeyboardInterrupt": (130, "drydock: error: interrupted (see inv runs.list for the steps that ran)"),
        "Interrupted": (130, "drydock: error: interrupted during restore: the swap did not run"),
        "DrydockError": (1, "drydock: error: staging: the check failed")}

    @one_line_errors
    def test(c):  # a task that records no steps: no run to look up in runs/
        raise KeyboardInterrupt

    with pytest.raises(Exit) as exited:
        test(None)
    assert (exited.value.code, exited.value.message) == (130, "drydock: error: interrupted")


def test_drydock_callbacks_stay_enabled_beside_ones_asked_for_in_the_environment(monkeypatch):
    from drydock.playbook import ansible_env

    monkeypatch.setenv("ANSIBLE_CALLBACKS_ENABLED", "ansible.posix.profile_tasks, drydock_failures")
    assert ansible_env()["ANSIBLE_CALLBACKS_ENABLED"] == ("ansible.posix.profile_tasks,drydock_failures,drydock_progress,"
                                                          "drydock_workers,drydock_module_cache")
    monkeypatch.delenv("ANSIBLE_CALLBACKS_ENABLED")
    assert "ANSIBLE_CALLBACKS_ENABLED" not in ansible_env()  # ansible.cfg's list holds


def test_the_unfinished_step_mark_refuses_and_is_kept_while_its_step_runs(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from drydock import lock, unfinished

    mark = unfinished.path(tmp_path)
    mark.parent.mkdir(parents=True)
    dead = {**unfinished.record("run-1", "migrate (all)"), "pid": 2 ** 22 + 1, "snapshot": "before_step"}
    mark.write_text(json.dumps(dead))
    assert "inv snapshot.restore before_step" in str(unfinished.refusal("migrate", unfinished.read(tmp_path)))
    unfinished.clear_unless_running(tmp_path)
    assert unfinished.read(tmp_path) is None  # its process is gone: a pull or restore clears it
    step = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a running `inv migrate`
    try:
        deadline = time.monotonic() + 10  # until exec: a child just forked shows its parent's command line
        while b"sleep(30)" not in Path(f"/proc/{step.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in step never started"
            time.sleep(0.01)
        # The same pid, but given to a later process: the step that wrote the mark is gone.
        mark.write_text(json.dumps({**dead, "pid": step.pid, "process_start": "another boot/1"}))
        assert "did not finish" in str(unfinished.refusal("migrate", unfinished.read(tmp_path)))
        unfinished.clear_unless_running(tmp_path)
        assert unfinished.read(tmp_path) is None
        # A mark from before starts were recorded, whose pid some other program (not Invoke) has now.
        old = {key: value for key, value in dead.items() if key != "process_start"}
        mark.write_text(json.dumps({**old, "pid": step.pid}))
        assert "did not finish" in str(unfinished.refusal("migrate", unfinished.read(tmp_path)))
        mark.write_text(json.dumps({**dead, "pid": step.pid, "process_start": lock.process_start(step.pid)}))
        assert "is changing the local database" in str(unfinished.refusal("migrate", unfinished.read(tmp_path)))
        unfinished.clear_unless_running(tmp_path)
        assert unfinished.read(tmp_path) is not None  # a running step's mark is its own
        # A mark torn by a kill is still a mark: the step did not finish.
        for torn in ("{", ""):
            mark.write_text(torn)
            assert unfinished.read(tmp_path) == {}
            assert "did not finish" in str(unfinished.refusal("migrate", unfinished.read(tmp_path)))
    finally:
        step.kill()
        step.wait()


def make_backup(root, env, stamp, with_dump=True):
    folder = root / env / stamp
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(
        {"source": {"env": env}, "dump": {"sha256": "x", "size": 1}, "row_counts": {"t": 1}, "created": stamp}))
    if with_dump:
        (folder / f"db-{stamp}.dump").write_bytes(b"PGDMP")
    return folder


def test_sandbox_down_stops_everything_when_its_output_is_closed(tmp_path):
    """`inv sandbox.down | head -1`: the pipe closes after the first line, and the stopping
    must go on all the same."""
    import subprocess

    from drydock.sandbox import Sandbox

    def closed_output(message: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    marker = "drydock-test-sandbox-down"
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)", marker],
                                 stdout=subprocess.PIPE) for _ in range(2)]
    # A process given a recorded pid since (the sandbox's own died): its command line does not
    # name the sandbox's marker, so it is not the sandbox's and must survive.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)", "bystander"],
                                 stdout=subprocess.PIPE)
    try:
        # Started for sure: Popen returns during the exec, before the kernel shows the new
        # command line (and so the marker) in /proc; a loaded machine showed that window.
        assert [p.stdout.readline() for p in [*sleepers, bystander]] == [b"\n", b"\n", b"\n"]
        box = Sandbox(root=tmp_path / "sandbox", say=closed_output)
        box.root.mkdir()
        box.pids_file.write_text(json.dumps({**{f"sleeper{i}": {"pid": p.pid, "marker": marker}
                                                for i, p in enumerate(sleepers)},
                                             "postgres-gone": {"pid": bystander.pid, "marker": marker + "-data"}}))
        box.down()
        assert [p.wait(timeout=10) for p in sleepers] == [-15, -15]  # both got SIGTERM
        assert bystander.poll() is None
        assert not box.root.exists()
    finally:
        for sleeper in [*sleepers, bystander]:
            sleeper.kill()
            sleeper.wait()
            sleeper.stdout.close()


def test_latest_picks_the_newest_complete_backup(tmp_path):
    make_backup(tmp_path, "production", "20260101T000000Z")
    newest = make_backup(tmp_path, "production", "20260102T000000Z")
    make_backup(tmp_path, "production", "20260103T000000Z", with_dump=False)  # interrupted fetch
    # An older backup copied aside by hand, under a name that sorts after every timestamp.
    make_backup(tmp_path, "production", "keep-before-release")
    assert dumps.latest("production", root=tmp_path).path.parent == newest


def test_latest_without_backups_says_what_to_do(tmp_path):
    with pytest.raises(DrydockError, match="inv backup staging"):
        dumps.latest("staging", root=tmp_path)


def test_an_environments_folder_given_as_a_dump_names_its_newest_backup(tmp_path):
    make_backup(tmp_path, "production", "20260101T000000Z")
    newest = make_backup(tmp_path, "production", "20260102T000000Z")
    with pytest.raises(DrydockError, match=f"it holds backups: give one of them, e.g. {newest}\\)$"):
        dumps.load(tmp_path / "production")


def test_load_requires_a_manifest(tmp_path):
    dump = tmp_path / "x.dump"
    dump.write_bytes(b"PGDMP")
    with pytest.raises(DrydockError, match="no manifest.json"):
        dumps.load(dump)


@pytest.mark.parametrize("damage", [
    lambda m: m["dump"].pop("size"), lambda m: m.pop("created"), lambda m: m["row_counts"].update(t="many"),
    lambda m: m.update(source="production"), lambda m: m.update(row_counts=[1]), lambda m: m["dump"].pop("sha256"),
])
def test_load_refuses_an_incomplete_manifest_in_one_line(tmp_path, damage):
    folder = make_backup(tmp_path, "production", "20260101T000000Z")
    manifest = json.loads((folder / "manifest.json").read_text())
    damage(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DrydockError, match=r"manifest.json is not a drydock manifest \(or an incomplete one\)$"):
        dumps.load(folder)


def test_schema_diff_names_each_object_and_ignores_deparse_noise():
    from drydock_pg import schema_diff

    reference = {"table": {"t": "table", "gone": "table"}, "column": {"t.a": "integer not null", "t.b": "text null"},
                 "index": {"i": "CREATE INDEX i ON public.t USING btree (a) WHERE ((b)::text = ANY ((ARRAY['x'::character varying])::text[]))"}}
    restored = {"table": {"t": "table"}, "column": {"t.a": "bigint not null", "t.c": "text null"},
                "index": {"i": "CREATE INDEX i ON public.t USING btree (a) WHERE ((b)::text = ANY (ARRAY[('x'::character varying)::text]))"}}
    assert schema_diff(reference, restored) == [
        "table gone: missing",
        "column t.a: is bigint not null, expected integer not null",
        "column t.b: missing (expected text null)",
        "column t.c: not in the code's schema (text null)",
    ]


def test_migration_diff_both_ways():
    from drydock_pg import migration_diff

    assert migration_diff([["blog", "0001"], ["blog", "0002"]], [["blog", "0001"], ["blog", "0099_by_hand"]]) == [
        "migration blog.0099_by_hand: recorded in django_migrations but not in the code",
        "migration blog.0002: in the code but not applied",
    ]


def test_writes_are_named_per_table_and_a_reset_or_counters_going_back_are_not_writes():
    from drydock_pg import count_writes

    before = {"stats_reset": None, "tables": {"a": 5, "b": 1}}
    assert count_writes(before, {"stats_reset": None, "tables": {"a": 5, "b": 3, "c": 0}}, None, None) == (
        ["b (+2)", "c (new table)"], None)
    assert count_writes(before, before, None, None) == ([], None)
    assert count_writes(before, {"stats_reset": "2026-01-01", "tables": {}}, None, None) == (
        [], "its write statistics were reset (2026-01-01)")
    writes, why = count_writes(before, {"stats_reset": None, "tables": {"a": 2, "b": 9}}, None, None)
    assert writes == [] and why.startswith("its write counters went back")
    # A TRUNCATE leaves the counters as they were and gives the table a new file.
    files = {**before, "files": {"a": 10, "b": 11}}
    assert count_writes(files, {**files, "files": {"a": 10, "b": 12}}, None, None) == (
        ["b (truncated or rewritten)"], None)
    assert count_writes(files, {**files, "tables": {"a": 7, "b": 1}, "files": {"a": 20, "b": 11}}, None, None) == (
        ["a (+2, truncated or rewritten)"], None)
    assert count_writes(before, {**files, "files": {"a": 20, "b": 21}}, None, None) == ([], None)  # an older baseline


def test_writes_count_from_the_baseline_of_a_push_of_the_same_backup_only():
    from drydock_pg import count_writes

    backup = {"database_oid": 100, "stats_reset": None, "tables": {"a": 5}}
    now = {"database_oid": 200, "stats_reset": None, "tables": {"a": 900}}
    pushed = {"lineage_sha256": "b1", "recorded": "20261203T160000Z",
              "write_fingerprint": {"database_oid": 200, "stats_reset": None, "tables": {"a": 899}}}
    assert count_writes(backup, {**now, "database_oid": 100, "tables": {"a": 5}}, pushed, "b1") == ([], None)
    assert count_writes({**backup, "database_oid": None}, {**now, "tables": {"a": 6}}, None, "b1") == (["a (+1)"], None)
    assert count_writes(backup, now, pushed, "b1") == (["a (+1)"], None)  # from the push's baseline
    assert count_writes(backup, now, pushed, "b2") == (
        [], "its database was replaced by a push at 20261203T160000Z, from another backup")
    copy = {"source": "local", "created": "20261203T155900Z", "sha256": "c1"}  # the dump it swapped in
    assert count_writes(backup, now, {**pushed, "copy": copy}, "b2") == (
        [], "its database was replaced by a push from local's dump 20261203T155900Z at 20261203T160000Z,"
            " from another backup")
    assert count_writes(backup, now, None, "b1") == ([], "its database was replaced")  # nothing recorded
    assert count_writes(backup, {**now, "database_oid": 300}, pushed, "b1") == (
        [], "its database was replaced")  # replaced again since the push


def test_lock_refuses_a_live_holder_and_clears_a_dead_one(tmp_path):
    import os
    import socket
    import subprocess
    import time

    from drydock.lock import process_start, target_lock

    with target_lock("staging", "push", say=lambda m: None, root=tmp_path) as path:
        with pytest.raises(DrydockError, match="staging is locked by push"):
            with target_lock("staging", "pipeline", say=lambda m: None, root=tmp_path):
                pass
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "task": "push", "started": "x"}))
    said = []
    with target_lock("staging", "push", say=said.append, root=tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in said[0] and not path.exists()
    # Another machine's lock (a checkout on shared storage): its PID means nothing here.
    other = {"pid": dead.pid, "host": f"not-{socket.gethostname()}", "task": "push", "started": "x"}
    path.write_text(json.dumps(other))
    with pytest.raises(DrydockError, match=r"staging is locked by push \(pid \d+ on not-.*\(if that run is gone from "
                                           r"not-.*, delete .*staging\.lock\)\Z"):
        with target_lock("staging", "pipeline", say=said.append, root=tmp_path):
            pass
    assert json.loads(path.read_text()) == other
    path.unlink()
    # A live process with the holder's pid, started after it: the pid was reused, the lock is stale.
    alive = subprocess.Popen(["sleep", "30"])
    try:
        # Its start is /proc/<pid>/stat's starttime: ticks since boot, so boot time + it is about now.
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
        ticks = int(process_start(alive.pid).rsplit("/", 1)[1])
        assert abs(boot + ticks / os.sysconf("SC_CLK_TCK") - time.time()) < 5
        path.write_text(json.dumps({"pid": alive.pid, "process_start": "another boot/1", "host": socket.gethostname(),
                                    "task": "push", "started": "x"}))
        with target_lock("staging", "push", say=said.append, root=tmp_path):
            pass
        assert "stale lock" in said[1]
        path.write_text(json.dumps({"pid": alive.pid, "process_start": process_start(alive.pid),
                                    "host": socket.gethostname(), "task": "push", "started": "x"}))
        with pytest.raises(DrydockError, match="staging is locked by push"):
            with target_lock("staging", "push", say=said.append, root=tmp_path):
                pass
    finally:
        alive.kill()
        alive.wait()


def test_a_torn_lock_is_cleared_and_a_held_guard_times_out(tmp_path, monkeypatch):
    """A run killed between creating its lock and writing it leaves an empty file: no run
    could ever take the lock again. A process that keeps the guard (stopped) must not hang
    every later command."""
    import subprocess

    from drydock import lock

    (tmp_path / "locks").mkdir()
    said = []
    for torn in ("", "[]"):
        (tmp_path / "locks" / "staging.lock").write_text(torn)
        with lock.target_lock("staging", "push", say=said.append, root=tmp_path) as path:
            assert json.loads(path.read_text())["task"] == "push"
        assert "clearing an unreadable lock on staging" in said.pop()
    monkeypatch.setattr(lock, "GUARD_TIMEOUT_S", 0.3)

    def hold_the_guard() -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                                   "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                                   "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
                                   str(tmp_path / "locks" / ".guard")], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
        return holder

    holder = hold_the_guard()
    try:
        with pytest.raises(DrydockError, match="has been held by another process"):
            with lock.target_lock("staging", "push", say=said.append, root=tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # Held as a run ends: its work stands, and it says its lock is left for the next run.
    with lock.target_lock("staging", "push", say=said.append, root=tmp_path) as path:
        holder = hold_the_guard()
    try:
        assert "could not release the lock on staging" in said.pop()
        assert json.loads(path.read_text())["pid"] == os.getpid()  # stale once this process ends
    finally:
        holder.kill()
        holder.wait()


def test_two_runs_finding_the_same_stale_lock_do_not_both_take_it(tmp_path, monkeypatch):
    """The order that lost a lock before the guard: both runs read the stale lock, the first
    clears it and takes the lock, then the second, still judging what it read, clears the
    first's lock and takes one too. Here the first judges only once the second is judging (or
    after 2 s, when the guard keeps the second waiting), and the second judges slowly."""
    import socket
    import subprocess
    import threading
    import time

    from drydock import lock

    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "locks" / "staging.lock"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "task": "push", "started": "x"}))
    judged, calls, second_judging = lock.owner_running, [], threading.Event()

    def owner_running(record):
        calls.append(record)
        if len(calls) == 1:
            second_judging.wait(2)
        else:
            second_judging.set()
            time.sleep(0.5)
        return judged(record)

    monkeypatch.setattr(lock, "owner_running", owner_running)
    held, refused = [], []

    def push():
        try:
            with lock.target_lock("staging", "push", say=lambda m: None, root=tmp_path):
                held.append(json.loads(path.read_text()))
                time.sleep(1)
        except DrydockError as error:
            refused.append(str(error))

    runs = [threading.Thread(target=push) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(held) == 1 and len(refused) == 1 and "staging is locked by push" in refused[0]
    assert not path.exists()  # the holder removed its own lock, and only that


def test_a_run_removes_only_its_own_lock(tmp_path):
    from drydock.lock import target_lock

    with target_lock("staging", "push", say=lambda m: None, root=tmp_path) as path:
        path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "task": "pipeline", "started": "x"}))
    assert json.loads(path.read_text())["task"] == "pipeline"


def test_the_locks_folder_is_private_from_the_first_lock(tmp_path, permissive_umask):
    """A lock names the task and process of a run on each environment: runs/ and runs/locks/
    are 0700 as the first lock makes them."""
    from drydock.lock import target_lock

    runs = tmp_path / "runs"
    with target_lock("staging", "push", say=lambda m: None, root=runs) as path:
        assert path.parent == runs / "locks"
        modes = {folder.name: oct(stat.S_IMODE(folder.stat().st_mode)) for folder in (runs, path.parent)}
        assert modes == {"runs": "0o700", "locks": "0o700"}


@pytest.mark.parametrize("a, b, same", [
    ("CHECK (((a OR b) AND c))", "CHECK ((a OR (b AND c)))", False),
    ("CHECK ((((x)::integer > 0)))", "CHECK ((x > 0))", True),
    ("bigint not null default nextval('t_id_seq'::regclass)", "bigint not null identity", True),
    ("text not null", "character varying(255) not null", False),
])
def test_normalized_keeps_meaning_and_drops_deparse_noise(a, b, same):
    from drydock_pg import normalized

    assert (normalized(a) == normalized(b)) is same


def test_snapshot_listing_says_which_have_a_ready_copy_and_why_one_failed():
    from datetime import datetime, timezone

    from drydock.workflow import format_snapshots

    base = {"source": "wagtail_site", "size": 3 * 1048576, "created": "2026-12-01T10:00:00+00:00"}
    text = format_snapshots([dict(base, name="a", ready=True), dict(base, name="b", ready=False),
                             dict(base, name="c", ready=False, ready_copy_error="disk full")],
                            now=datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "of", "database", "size", "age", "ready", "copy"]
    assert [line.split()[-1] for line in lines[1:4]] == ["yes", "no", "failed"]
    assert lines[4] == "c: making its ready copy failed: disk full"


@pytest.mark.parametrize("created", [None, 20240101, "yesterday", "2024-01-01 10:00"])
def test_a_snapshot_whose_record_has_no_time_drydock_can_read_is_listed_without_an_age(created):
    """Any database whose name holds __snap_ is listed, with what its comment says: someone
    else's record (a time without its offset, a number) must not stop the listing."""
    from datetime import datetime, timezone

    from drydock.workflow import format_snapshots

    snap = {"name": "2024", "source": "reports", "size": 1048576, "created": created, "ready": False}
    text = format_snapshots([snap], now=datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc))
    assert text.splitlines()[1].split() == ["2024", "reports", "1.0", "MB", "?", "no"]


def test_the_local_database_has_one_lock_whatever_the_inventory_calls_its_host(tmp_path, monkeypatch):
    """Snapshot commands read no inventory: every command that changes the local database
    must take the lock they take, `local`, even where the local host is called `laptop`."""
    from drydock import inventory, workflow
    from drydock.inventory import HOST_VARIABLES, Inventory
    from drydock.lock import target_lock

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path))
    described = {name: "x" for name in HOST_VARIABLES}
    laptop = Inventory(servers=("production", "staging"), local=("laptop",),
                       hostvars={"production": described, "staging": described, "laptop": described})
    monkeypatch.setattr(inventory, "load", lambda: laptop)
    monkeypatch.setattr(inventory, "sandbox_down", lambda: False)  # this inventory is not the sandbox's
    monkeypatch.setattr(workflow, "run_playbook", lambda *a, **k: pytest.fail("a playbook ran under another's lock"))
    with target_lock("local", "pull", say=lambda m: None, root=tmp_path):
        for command in (workflow.migrate, lambda: workflow.site("laptop", "example.org", 80),
                        lambda: workflow.snapshot("restore", "saved"), lambda: workflow.push("staging")):
            with pytest.raises(DrydockError, match=r"^local is locked by pull"):
                command()


def test_an_inventory_with_a_server_called_local_is_refused(tmp_path, monkeypatch):
    from drydock import inventory

    hosts = tmp_path / "hosts.yml"
    hosts.write_text("all:\n  children:\n    drydock_servers:\n      hosts:\n        local: {}\n"
                     "    drydock_local:\n      hosts:\n        laptop: {ansible_connection: local}\n")
    monkeypatch.setenv("DRYDOCK_INVENTORY", str(hosts))
    inventory.load.cache_clear()
    try:
        with pytest.raises(DrydockError, match="a server in drydock_servers is called 'local'"):
            inventory.load()
    finally:
        inventory.load.cache_clear()


def test_an_inventory_path_that_does_not_exist_is_named(tmp_path, monkeypatch):
    """Ansible only warns about a missing inventory, then finds no hosts: say what is wrong."""
    from drydock import inventory

    monkeypatch.setenv("DRYDOCK_INVENTORY", str(tmp_path / "nosuch"))
    inventory.load.cache_clear()
    try:
        with pytest.raises(DrydockError, match=f"^no inventory at {tmp_path}/nosuch \\(DRYDOCK_INVENTORY="):
            inventory.load()
    finally:
        inventory.load.cache_clear()


def test_the_inventory_is_read_whatever_verbosity_the_playbooks_get(tmp_path, monkeypatch):
    """ANSIBLE_VERBOSITY=3 for a run's playbooks must not put ansible-inventory's own lines
    into the JSON drydock reads the inventory from."""
    from drydock import inventory

    hosts = tmp_path / "hosts.yml"
    hosts.write_text("all:\n  children:\n    drydock_servers:\n      hosts:\n        staging: {}\n"
                     "    drydock_local:\n      hosts:\n        laptop: {ansible_connection: local}\n")
    monkeypatch.setenv("DRYDOCK_INVENTORY", str(hosts))
    monkeypatch.setenv("ANSIBLE_VERBOSITY", "3")
    inventory.load.cache_clear()
    try:
        assert inventory.load().servers == ("staging",)
    finally:
        inventory.load.cache_clear()


def test_the_sandbox_commands_set_a_real_inventory_aside(monkeypatch):
    """demo, test and bench call this first: a real inventory exported in the shell would
    otherwise aim them at the real production and staging."""
    from drydock.playbook import ansible_env, sandbox_inventory_only

    monkeypatch.setenv("DRYDOCK_INVENTORY", "inventories/example")
    monkeypatch.setenv("ANSIBLE_INVENTORY", "/srv/site/hosts.yml")
    said = []
    sandbox_inventory_only(said.append)
    assert said == ["DRYDOCK_INVENTORY=inventories/example is set aside: this runs on the sandbox only",
                    "ANSIBLE_INVENTORY=/srv/site/hosts.yml is set aside: this runs on the sandbox only"]
    assert "ANSIBLE_INVENTORY" not in ansible_env() and "DRYDOCK_INVENTORY" not in ansible_env()


@pytest.mark.parametrize("key, refusal", [
    (EOFError, "not confirmed: nothing was done to production"),  # Ctrl-D: a refusal (exit 1)
    # Ctrl-C: exit 130, and not "see inv runs.list for the steps that ran": no run has begun.
    (KeyboardInterrupt, "interrupted at the confirmation: nothing was done to production")])
def test_ctrl_d_or_ctrl_c_at_the_confirmation_prompt_says_nothing_was_done(monkeypatch, key, refusal):
    import sys

    from drydock import workflow
    from drydock.errors import Interrupted

    def pressed(prompt):
        raise key

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    with pytest.raises(DrydockError, match=f"^{refusal}$") as raised:
        workflow.confirm("production", True, False, "push to", ask=pressed)
    assert isinstance(raised.value, Interrupted) == (key is KeyboardInterrupt)


@pytest.mark.parametrize("flag, protected", [
    *[(false, False) for false in ("false", "no", "off", "0", "No", "FALSE", 0, False)],
    ("yes", True), ("true", True), ("On", True), ("1", True), (1, True), (True, True)])
def test_protected_reads_the_flag_as_the_playbooks_do(flag, protected):
    """A string "false" in an inventory is false to Ansible's `| bool`: drydock must agree, or
    it would ask for a name the playbook then ignores (and the other way round)."""
    from ansible.plugins.filter.core import to_bool

    from drydock.inventory import Inventory

    inventory = Inventory(servers=("production", "staging", "qa", "live"), local=("local",), hostvars={
        "production": {"drydock_protected": "yes"}, "staging": {"drydock_protected": flag}, "qa": {},
        # A template still unrendered (load() renders them; not this Inventory): unreadable, so protected
        "live": {"drydock_protected": "{{ inventory_hostname == 'live' }}"}})
    assert [inventory.protected(env) for env in inventory.servers] == [True, protected, False, True]
    assert to_bool(flag) is protected  # the playbooks' `drydock_protected | bool`


@pytest.mark.parametrize("flag", ["y", "t", "n", "f", "", "none", " false", "enabled", None, 2, 0.0, ["yes"]])
def test_a_flag_drydock_and_the_playbooks_would_read_apart_is_refused(flag):
    """Ansible's `| bool` takes any word but true/false/yes/no/on/off/1/0 for false: a "y"
    would be protected for drydock's prompt, and unprotected for the playbooks' guards."""
    from drydock.inventory import HOST_VARIABLES, SAFETY_FLAGS, Inventory
    from drydock.validate import InvalidInput

    inventory = Inventory(servers=("production",), local=("local",),
                          hostvars={"production": {"drydock_protected": flag}})
    refusal = (r"^{} of production is .*: write true or false \(the playbooks read only "
               r"true/yes/on/1/false/no/off/0, and take anything else for false\)$")
    with pytest.raises(InvalidInput, match=refusal.format("drydock_protected")):
        inventory.protected("production")
    # Every command that names the environment refuses it alike, before its run begins: a
    # backup reads neither flag, and its playbook's check would say so only once under way.
    described = {name: "x" for name in HOST_VARIABLES}
    for name in SAFETY_FLAGS:
        inventory = Inventory(servers=("production",), local=("local",),
                              hostvars={"production": {**described, name: flag}})
        with pytest.raises(InvalidInput, match=refusal.format(name)):
            inventory.server("production")


def test_describe_origin_says_what_the_swaps_recorded():
    pulled = {"drydock_lineage": {"env": "production", "created": "20261204T100000Z", "sha256": "a"},
              "swapped_in": "2026-12-04T10:01:00+00:00", "swapped_in_by": "swap"}
    assert describe_origin(pulled, live=True) == ("restored from production's backup 20261204T100000Z;"
                                                  " live since 2026-12-04T10:01:00+00:00")
    pushed = {"drydock_pushed_copy": {"source": "local", "created": "20261204T110000Z", "sha256": "b",
                                      "lineage": {"env": "production", "created": "20261204T100000Z"}},
              "swapped_in": "2026-12-04T11:01:00+00:00", "swapped_in_by": "swap",
              "set_aside": "2026-12-04T12:00:00+00:00", "set_aside_by": "exchange"}
    assert describe_origin(pushed, live=False) == (
        "pushed from local's dump 20261204T110000Z (a copy of production's backup 20261204T100000Z);"
        " live from 2026-12-04T11:01:00+00:00 until a rollback at 2026-12-04T12:00:00+00:00")
    safety = {"drydock_pushed_copy": {"source": "production", "created": "20261204T090000Z", "kind": "safety backup"}}
    assert describe_origin(safety, live=True) == "pushed from production's safety backup 20261204T090000Z"
    assert describe_origin({**pushed, "set_aside_by": "swap"}, live=False).endswith(
        " until it was replaced at 2026-12-04T12:00:00+00:00")
    # A swap-back after its failed check says why; a rollback of it with --allow-failed-check
    # and its reverse (an exchange) leave that behind.
    failed = {**pushed, "set_aside_by": "swap-back", "failed_check": "Status code was 404"}
    assert describe_origin(failed, live=False).endswith(
        " until a swap-back at 2026-12-04T12:00:00+00:00: it failed its check (Status code was 404)")
    assert describe_origin({**failed, "set_aside_by": "exchange"}, live=False).endswith(
        " until a rollback at 2026-12-04T12:00:00+00:00")
    # Live again (a rollback's reverse), even within the same second as it was set aside.
    for again in ("2026-12-04T12:05:00+00:00", "2026-12-04T12:00:00+00:00"):
        assert describe_origin({**pushed, "swapped_in": again, "swapped_in_by": "exchange"}, live=True).endswith(
            f"; live since {again}, by a rollback")
    # Times that contradict the database's place (renamed by hand, an older record) are left out.
    assert describe_origin(pushed, live=True).endswith("production's backup 20261204T100000Z)")
    assert describe_origin({**pulled, "set_aside": "2026-12-04T09:00:00+00:00"}, live=False) == (
        "restored from production's backup 20261204T100000Z")
    assert describe_origin({"set_aside": "2026-12-04T12:00:00+00:00", "set_aside_by": "snapshot restore"},
                           live=False) == ("origin unknown (not restored by drydock);"
                                           " set aside at 2026-12-04T12:00:00+00:00, by a snapshot restore")
    assert describe_origin({"set_aside": "2026-12-04T12:00:00+00:00"}, live=True) == "origin unknown (not restored by drydock)"
    # Someone else's JSON under drydock's keys is not read as a record.
    assert describe_origin({"drydock_pushed_copy": "x", "swapped_in": 5, "set_aside": None}, live=True) == (
        "origin unknown (not restored by drydock)")


def test_an_interrupted_backup_or_push_names_the_dumps_it_fetched_whole(tmp_path, monkeypatch):
    from drydock import workflow
    from drydock.journal import Run

    monkeypatch.setenv("DRYDOCK_BACKUPS", str(tmp_path / "backups"))
    run = Run("push", root=tmp_path / "runs")
    assert workflow._backup_interrupted(run, "production") == (
        "production is unchanged; a dump already started on its host may still finish there, unfetched (the host's"
        " rotation deletes it in time), and the next backup deletes the unfinished one here")
    assert workflow._safety_backup_note(run, "production") == ""
    local = tmp_path / "backups" / "local" / "20261205T010000Z" / "wagtail_site__outgoing.dump.zst"
    safety = tmp_path / "backups" / "production" / "safety" / "20261205T010100Z" / "wagtail_site.dump.zst"
    run.fetched += [local, safety]
    assert workflow._backup_interrupted(run, "production").endswith("the next backup deletes the unfinished one here")
    # One the push deleted again (it did not go live) before the interruption is not named.
    assert workflow._safety_backup_note(run, "production") == ""
    safety.parent.mkdir(parents=True)
    safety.write_bytes(b"PGDMP")
    assert workflow._safety_backup_note(run, "production") == (
        f"; its safety backup, taken before the interruption: {safety}")
    backup = tmp_path / "backups" / "production" / "20261205T010200Z" / "wagtail_site.dump.zst"
    run.fetched.append(backup)
    assert workflow._backup_interrupted(run, "production") == (
        f"production is unchanged; the backup was fetched whole before the interruption: {backup}")


def test_an_interrupted_snapshot_action_says_whether_its_module_ran(tmp_path, monkeypatch):
    from drydock import unfinished, workflow
    from drydock.journal import Run

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path / "runs"))
    run = Run("snapshot-restore", root=tmp_path)
    assert workflow._snapshot_interrupted(run, "restore", "saved", lambda: "site").startswith("the restore did not run")
    run.ansible_log.write_text("TASK [pg_snapshot : Run the snapshot action restore] ****\n")
    assert workflow._snapshot_interrupted(run, "restore", "saved", lambda: "site").startswith("whether the restore ran cannot be told")
    # A restore that ran makes the local database whole again: an unfinished step's mark goes.
    unfinished.path().parent.mkdir(parents=True)
    unfinished.path().write_text(json.dumps({"run": "r", "step": "migrate (all)", "pid": 2 ** 22 + 1}))

    def progress(*events: str) -> None:
        run.progress_file.write_text("".join(
            json.dumps({"event": event, "host": "local", "action": "drydock_snapshot", "task": "Run"}) + "\n"
            for event in events))

    progress("start")
    assert workflow._snapshot_interrupted(run, "restore", "saved", lambda: "site").startswith("the restore may have run")
    progress("start", "ok")
    assert workflow._snapshot_interrupted(run, "restore", "saved", lambda: "site") == (
        "the restore ran: the local database is back at snapshot saved; the one it replaced is kept as site__previous")
    assert unfinished.read() is None
    progress("start", "failed")
    assert workflow._snapshot_interrupted(run, "save", "saved", lambda: "site").startswith("the save did not run")


def test_an_interrupted_site_change_says_whether_the_site_changed(tmp_path):
    """The Site's change is one transaction: its module's progress tells whether it ran."""
    from drydock import workflow
    from drydock.journal import Run

    run = Run("site", root=tmp_path)
    assert workflow._site_interrupted(run, "production", "www.example.org", 443) == (
        "the Site of production is unchanged (its change had not begun, or failed and was undone)")

    def progress(*events: str) -> None:
        run.progress_file.write_text("".join(
            json.dumps({"event": event, "host": "production", "action": "drydock_site", "task": "Set"}) + "\n"
            for event in events))

    run.ansible_log.write_text("TASK [wagtail_site : Set the Site's hostname and port] ****\n")
    progress("start")
    assert workflow._site_interrupted(run, "production", "www.example.org", 443) == (
        "the Site of production is either unchanged or www.example.org:443, never half of each (one transaction):"
        " run the command again to be sure")
    progress("start", "ok")
    assert workflow._site_interrupted(run, "production", "www.example.org", 443) == (
        "the Site of production was set to www.example.org:443 before the interruption")
    progress("start", "failed")
    assert workflow._site_interrupted(run, "production", "www.example.org", 443).endswith("failed and was undone)")


def test_an_environment_without_the_host_variables_the_playbooks_need_is_refused_up_front():
    """A push would otherwise dump the local database, then fail where the restore first
    reads the missing variable."""
    from drydock.inventory import HOST_VARIABLES, Inventory

    described = {name: "x" for name in HOST_VARIABLES}
    inventory = Inventory(servers=("production", "staging"), local=("local",), hostvars={
        "production": described, "staging": {k: v for k, v in described.items() if k != "drydock_site_hostname"},
        "local": {k: v for k, v in described.items() if k not in ("drydock_db_port", "drydock_env")}})
    assert inventory.server("production") == "production"
    with pytest.raises(DrydockError, match=r"^staging lacks drydock_site_hostname in the inventory: the playbooks "
                                           r"need it \(docs/configuration.md, host variables\)$"):
        inventory.server("staging")
    with pytest.raises(DrydockError, match=r"^local lacks drydock_env, drydock_db_port in the inventory: the "
                                           r"playbooks need them"):
        inventory.local_env()
    down = Inventory(servers=("staging",), local=("local",), hostvars={"staging": {"drydock_sandbox_down": True}})
    with pytest.raises(DrydockError, match=r"^the sandbox is down: run ./inv sandbox.up first$"):
        down.server("staging")  # before any run or playbook starts (they would say so too)


def test_snapshot_commands_refuse_a_sandbox_that_is_down_before_a_run_begins(tmp_path, monkeypatch):
    """They read no inventory (Inventory._described's refusal never comes): without this,
    Ansible's lines and a failed run came before the same line."""
    import shutil

    from drydock import inventory, workflow
    from drydock.paths import project_root

    shutil.copy(project_root() / "ansible.cfg", tmp_path / "ansible.cfg")
    monkeypatch.setenv("DRYDOCK_ROOT", str(tmp_path))
    for name in ("DRYDOCK_INVENTORY", "ANSIBLE_INVENTORY"):
        monkeypatch.delenv(name, raising=False)
    for action, name in (("save", "before_notebook"), ("restore", "before_notebook"), ("delete", "x"), ("list", "")):
        with pytest.raises(DrydockError, match=r"^the sandbox is down: run ./inv sandbox.up first$"):
            workflow.snapshot(action, name)
    assert not (tmp_path / "runs").exists()
    (tmp_path / ".sandbox").mkdir()
    (tmp_path / ".sandbox" / "env.json").write_text("{}")
    assert not inventory.sandbox_down()
    (tmp_path / ".sandbox" / "env.json").unlink()
    monkeypatch.setenv("DRYDOCK_INVENTORY", "inventories/mysite")  # a real inventory: no sandbox to be down
    assert not inventory.sandbox_down()


def test_the_pipeline_refuses_a_sandbox_that_is_down_in_its_own_words(tmp_path, monkeypatch):
    """The sandbox's inventory gives its hosts no app database URL while it is down: checked
    first, that URL was refused as malformed, which sent the operator looking for a password."""
    import shutil

    from drydock import workflow
    from drydock.paths import project_root

    shutil.copy(project_root() / "ansible.cfg", tmp_path / "ansible.cfg")
    (tmp_path / "inventories" / "sandbox").mkdir(parents=True)
    shutil.copy(project_root() / "inventories" / "sandbox" / "hosts.py", tmp_path / "inventories" / "sandbox")
    monkeypatch.setenv("DRYDOCK_ROOT", str(tmp_path))
    for name in ("DRYDOCK_INVENTORY", "ANSIBLE_INVENTORY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DrydockError, match=r"^the sandbox is down: run ./inv sandbox.up first$"):
        workflow.pipeline("production", "staging", say=pytest.fail)
    assert not (tmp_path / "runs").exists()


def test_a_safety_backup_is_named_so_in_drydocks_lines(tmp_path):
    from drydock.dumps import Dump

    def dump(*folders: str) -> Dump:
        return Dump(tmp_path.joinpath("backups", "production", *folders, "20260101T000000Z", "x.dump.zst"), {})

    assert (dump("safety").kind, dump().kind) == ("safety backup", "dump")


def test_a_server_that_does_not_listen_is_named_in_drydock_words():
    from callback_plugins.drydock_failures import _one_line

    socket = "/srv/pg/run/.s.PGSQL.5433"
    libpq = f'connection to server on socket "{socket}" failed: Connection refused\n\tIs the server running locally' \
            ' and accepting connections on that socket?'
    expected = (f"no database server answers on {socket} (Connection refused): start it, or set drydock_db_socket_dir"
                " and drydock_db_port to its own")
    assert _one_line({"msg": f"connection is bad: {libpq}"}) == expected  # psycopg, in drydock's modules
    assert _one_line({"msg": f"unable to connect to database: connection is bad: {libpq}"}) == expected  # community.postgresql
    assert _one_line({"msg": f"wagtail_site__incoming: {libpq} (kept)"}) == f"wagtail_site__incoming: {expected} (kept)"
    # The app's own Python (a command: app_database.py, as the migration step asks it) connects
    # by the app's URL: its settings are what to correct, not drydock's socket.
    app = {"msg": "non-zero return code", "cmd": ["python", "app_database.py", "--server"], "rc": 1,
           "stderr_lines": [f"the app cannot reach its database: connection is bad: {' '.join(libpq.split())}"]}
    assert _one_line(app) == (f"the app cannot reach its database: no database server answers on {socket} (Connection"
                              " refused): start it, or point the host and port of drydock_app_database_url at it")
    # Over TCP, as the app's URL often connects: by its host and port (libpq adds the address it tried).
    app["stderr_lines"] = ['the app cannot reach its database: connection to server at "db.internal" (10.0.0.5), port 5433'
                           ' failed: Connection refused Is the server running on that host and accepting TCP/IP connections?']
    assert _one_line(app) == ("the app cannot reach its database: no database server answers on db.internal:5433 (Connection"
                              " refused): start it, or point the host and port of drydock_app_database_url at it")
    refused = 'connection to server on socket "/run/.s.PGSQL.5432" failed: FATAL:  Peer authentication failed for user "x"'
    assert _one_line({"msg": refused}) == " ".join(refused.split())  # a server that answers: its own words


FAILING_PLAY = """\
- hosts: production
  gather_facts: false
  tasks:
    - name: Fail on purpose
      ansible.builtin.fail:
        msg: broken on purpose
{where}
"""


@pytest.mark.parametrize("where, label", [
    ("", "production"),
    ("      delegate_to: \"{{ groups['drydock_local'][0] }}\"", "production (on local)"),
    # A looped task's own result keeps delegate_to unrendered: the item's says where it ran.
    ("      delegate_to: \"{{ groups['drydock_local'][0] }}\"\n      loop: [absent, present]", "production (on local)"),
    ("      delegate_to: localhost", "production"),  # drydock's own machine
], ids=["own-host", "delegated", "delegated-loop", "controller"])
def test_the_one_line_error_names_the_host_a_delegated_task_failed_on(tmp_path, where, label):
    """A verify of staging builds its reference schema on the local cluster: a failure there
    must not read as staging's. Real ansible-playbook runs, with drydock's failures callback."""
    import subprocess

    from drydock.paths import project_root
    from drydock.playbook import _last_failure, ansible_env

    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    (tmp_path / "hosts.json").write_text(json.dumps({"all": {"children": {
        "drydock_local": {"hosts": {"local": local}}, "drydock_servers": {"hosts": {"production": local}}}}}))
    (tmp_path / "play.yml").write_text(FAILING_PLAY.format(where=where))
    failures = tmp_path / "failures.jsonl"
    proc = subprocess.run(["ansible-playbook", "-i", str(tmp_path / "hosts.json"), str(tmp_path / "play.yml")],
                          cwd=project_root(), env=dict(ansible_env(), DRYDOCK_FAILURES_FILE=str(failures)),
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _last_failure(failures) == (f"{label}: broken on purpose", False)


def test_a_host_that_does_not_answer_is_named_with_the_task_it_was_at(tmp_path):
    """Ansible's message for an unreachable host names no task, and the playbooks' rescue
    blocks, which would say what the failure left, do not run for it. A real SSH connection
    to a loopback port where nothing listens."""
    import socket
    import subprocess

    from drydock.paths import project_root
    from drydock.playbook import _last_failure, ansible_env

    with socket.socket() as probe:  # a port free a moment ago: refused, at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": port}
    (tmp_path / "hosts.json").write_text(json.dumps({"all": {"hosts": {"staging": host}}}))
    (tmp_path / "play.yml").write_text("- hosts: staging\n  gather_facts: false\n  tasks:\n"
                                       "    - name: Upload the dump\n      ansible.builtin.ping:\n")
    failures = tmp_path / "failures.jsonl"
    proc = subprocess.run(["ansible-playbook", "-i", str(tmp_path / "hosts.json"), str(tmp_path / "play.yml")],
                          cwd=project_root(), env=dict(ansible_env(), DRYDOCK_FAILURES_FILE=str(failures)),
                          capture_output=True, text=True)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]  # Ansible's: a host unreachable
    line, unreachable = _last_failure(failures)
    assert unreachable
    assert line.startswith('staging: the host did not answer during the task "Upload the dump": Failed to connect to '
                           "the host via ssh: "), line
    assert "Connection refused" in line and "\n" not in line


@pytest.mark.parametrize("entry_point", ["tasks", "tests.conftest"])
def test_under_a_umask_of_000_what_drydock_makes_without_a_mode_is_not_writable_by_others(tmp_path, entry_point):
    """The sandbox's app script and pid records, a shard's copy: root runs or trusts them later."""
    import subprocess

    from drydock.paths import project_root

    made = subprocess.run(
        [sys.executable, "-c", f"import os, sys, {entry_point}; os.mkdir(sys.argv[1]); open(sys.argv[2], 'w').close()",
         str(tmp_path / "folder"), str(tmp_path / "file")],
        cwd=project_root(), env=dict(os.environ, PYTHONPATH=str(project_root() / "module_utils")),  # as pytest's pythonpath
        preexec_fn=lambda: os.umask(0), capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (oct(stat.S_IMODE((tmp_path / "folder").stat().st_mode)),
            oct(stat.S_IMODE((tmp_path / "file").stat().st_mode))) == ("0o755", "0o644")


def test_an_unfinished_steps_mark_goes_with_the_database_a_pull_keeps_as_pre_pull(tmp_path):
    """A pull keeps the half-changed database as snapshot pre_pull; restoring that snapshot
    makes it the live database again, with its mark; deleting it, or a later pull, forgets it."""
    from drydock import unfinished

    mark = {"run": "r1", "step": "notebook n.ipynb", "pid": 0, "snapshot": "before_step"}
    kept = dict(mark, kept_by_pull=True)  # before_step may be retaken by a later step meanwhile
    unfinished.path(tmp_path).parent.mkdir(parents=True)
    unfinished.path(tmp_path).write_text(json.dumps(mark))
    assert unfinished.pulled(tmp_path) == mark
    assert unfinished.read(tmp_path) is None and unfinished.read(tmp_path, "pre_pull") == kept
    assert unfinished.restored("other", tmp_path) is None and unfinished.read(tmp_path) is None
    assert unfinished.restored("pre_pull", tmp_path) == kept
    assert unfinished.read(tmp_path) == kept == unfinished.read(tmp_path, "pre_pull")  # the snapshot still holds it
    assert stat.S_IMODE(unfinished.path(tmp_path).stat().st_mode) == 0o600
    assert unfinished.left_half_changed(kept).endswith(
        "may have left the local database half-changed; pull again, or `inv snapshot.restore before_step` if no "
        "migration step has run since that one (each takes before_step anew)")
    unfinished.restored("other", tmp_path)  # a whole snapshot: the live database is whole again
    assert unfinished.read(tmp_path) is None
    assert unfinished.pulled(tmp_path) is None  # a pull of a whole database: pre_pull now holds that one
    assert unfinished.read(tmp_path, "pre_pull") is None
    unfinished.path(tmp_path).write_text(json.dumps(mark))
    unfinished.pulled(tmp_path)
    unfinished.snapshot_deleted("pre_pull", tmp_path)
    assert unfinished.read(tmp_path) is None and unfinished.read(tmp_path, "pre_pull") is None
    # A pull whose swap may or may not have run: both keep the mark, a false alarm on one.
    unfinished.path(tmp_path).write_text(json.dumps(mark))
    unfinished.pulled(tmp_path, swap_certain=False)
    assert unfinished.read(tmp_path) == mark and unfinished.read(tmp_path, "pre_pull") == kept


def test_a_step_reads_only_the_task_events_recorded_since_it_began(tmp_path):
    """A pipeline's rollback runs drydock_db_swap on the host its push swapped on, in the same
    run: the push's swap must not count as the rollback's (two starts read as a swap-back)."""
    def record(run: Run, *events: str) -> None:
        with run.progress_file.open("a") as progress:
            for event in events:
                progress.write(json.dumps({"event": event, "host": "staging", "action": "drydock_db_swap",
                                           "task": "Swap"}) + "\n")

    run = Run("pipeline", root=tmp_path)
    with run.step("restore", env="staging"):
        record(run, "start", "ok")
    with run.step("rollback staging", env="staging"):
        assert run.task_events("staging", "drydock_db_swap") == []
        record(run, "start")
        assert run.task_events("staging", "drydock_db_swap") == ["start"]
    assert run.task_events("staging", "drydock_db_swap") == ["start"]  # the last step's, once it ended
    assert Run.of(run.dir).task_events("staging", "drydock_db_swap") == ["start", "ok", "start"]  # runs.show: all


@pytest.mark.parametrize("events, line", [
    ([], "local: the restore of snapshot saved did not run: the local database and its snapshots are unchanged"),
    (["start"], "local: the restore of snapshot saved may have run, whole or not at all: `inv verify local` says which"
                " (its live database line ends `by a snapshot restore of <name>` if it did)"),
    (["start", "ok"], "local: the restore of snapshot saved ran")])
def test_runs_show_says_whether_a_killed_snapshot_command_ran(tmp_path, monkeypatch, events, line):
    """A SIGKILLed snapshot restore wrote no line of its own: runs.show tells from the progress
    Ansible reported whether its module ran, and changes nothing."""
    import subprocess
    import sys

    from drydock.workflow import runs_show

    monkeypatch.setenv("DRYDOCK_RUNS", str(tmp_path))
    script = ("import json, sys, time; from pathlib import Path; from drydock.journal import Run\n"
              "run = Run('snapshot-restore', root=Path(sys.argv[1]))\n"
              "with run.step('snapshot restore', snapshot='saved'):\n"
              "    with run.progress_file.open('a') as progress:\n"
              "        for event in sys.argv[2:]:\n"
              "            progress.write(json.dumps({'event': event, 'host': 'local', 'action': 'drydock_snapshot',"
              " 'task': 'Run'}) + '\\n')\n"
              "    print('in', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), *events], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "in\n"
    child.kill()
    child.wait()
    child.stdout.close()
    (folder,) = [path for path in tmp_path.iterdir() if path.name.endswith("-snapshot-restore")]
    said = []
    runs_show(folder.name, say=said.append)
    assert said[1:3] == ["killed at snapshot restore: the run ended during snapshot restore without finishing it (killed?)",
                         line], said
