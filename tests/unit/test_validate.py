import json
import stat
import subprocess

import pytest

from drydock import validate
from drydock.validate import InvalidInput


@pytest.mark.parametrize("name", ["localhost", "www.drydock-example.org", "a.b-c.d", "x1.test", "a" * 63 + ".com"])
def test_good_hostnames(name):
    assert validate.hostname(name) == name


def test_a_hostname_comes_back_lower_cased_as_wagtail_matches_it():
    assert validate.hostname("Preview.Example.ORG") == "preview.example.org"


@pytest.mark.parametrize("name", ["", "bad host", "x';--", '"q"', "-a.com", "a-.com", "a..b", "a" * 64 + ".com",
                                  "under_score.com", "host:8000", "ümlaut.de", "a\nb", "example.org\n", "trailing-.test",
                                  ".".join(["a" * 63] * 4) + ".com"])  # valid labels, 260 characters in all
def test_bad_hostnames(name):
    with pytest.raises(InvalidInput, match="invalid hostname"):
        validate.hostname(name)


@pytest.mark.parametrize("value, ok", [(1, True), ("443", True), (65535, True), (0, False), (65536, False), ("x", False)])
def test_ports(value, ok):
    if ok:
        assert validate.port(value) == int(value)
    else:
        with pytest.raises(InvalidInput):
            validate.port(value)


@pytest.mark.parametrize("value, ok", [(1, True), ("5", True), (0, False), ("x", False), (None, False)])
def test_counts(value, ok):
    if ok:
        assert validate.count(value, "--keep") == int(value)
    else:
        with pytest.raises(InvalidInput, match="--keep"):
            validate.count(value, "--keep")


@pytest.mark.parametrize("name, ok", [("production", True), ("stage-2", True), ("production\n", False),
                                      ("Prod", False), ("a b", False), ("", False)])
def test_environment_names(name, ok):
    if ok:
        assert validate.environment_name(name) == name
    else:
        with pytest.raises(InvalidInput):
            validate.environment_name(name)


def test_an_unknown_environment_is_named_with_every_choice_the_command_takes():
    from drydock.inventory import HOST_VARIABLES, Inventory

    described = {name: "x" for name in HOST_VARIABLES}
    inv = Inventory(servers=("production", "staging"), local=("local",),
                    hostvars={"production": described, "staging": described, "local": described})
    assert inv.environment("local") == "local" and inv.server("staging") == "staging"
    with pytest.raises(InvalidInput, match=r"unknown environment 'nosuch': choose one of production, staging, local\Z"):
        inv.environment("nosuch")
    with pytest.raises(InvalidInput, match=r"unknown environment 'nosuch': choose one of production, staging\Z"):
        inv.server("nosuch")
    with pytest.raises(InvalidInput, match=r"'local' is the local database, not a server: choose one of production, staging\Z"):
        inv.server("local")


@pytest.mark.parametrize("args, message", [
    (["site", "staging", "ok.example", "--port", "abc"], "invalid port 'abc': not a number"),
    (["bench", "--runs", "abc"], "invalid --runs 'abc': not a number"),
    (["sandbox.up", "--posts", "x"], "invalid --posts 'x': not a number"),
    (["test", "--shards", "two"], "invalid --shards 'two': not a number"),
    (["runs.list", "--last", "all"], "invalid --last 'all': not a number"),
])
def test_a_number_option_given_text_gets_one_line_not_a_traceback(args, message):
    from tests.conftest import error_lines, inv

    proc = inv(*args)
    assert proc.returncode == 1 and error_lines(proc) == [f"drydock: error: {message}"]


def test_a_missing_notebook_or_a_folder_for_a_script_is_refused_before_anything_runs():
    from drydock.paths import runs_dir
    from tests.conftest import error_lines, inv

    before = set(runs_dir().glob("*-pipeline")) | set(runs_dir().glob("*-migrate"))
    proc = inv("pipeline", "production", "staging", "--notebook", "nope.ipynb")
    assert proc.returncode == 1 and error_lines(proc) == ["drydock: error: no such file: nope.ipynb"]
    proc = inv("migrate", "--script", "examples/")  # a folder where a file belongs: said so
    assert proc.returncode == 1 and error_lines(proc) == ["drydock: error: a folder, not a file: examples/"]
    assert set(runs_dir().glob("*-pipeline")) | set(runs_dir().glob("*-migrate")) == before  # no run was started


@pytest.mark.parametrize("text", ["{not json", '{"cells": "not a list"}'])
def test_a_notebook_papermill_cannot_read_is_refused_before_anything_runs(tmp_path, text):
    from drydock.paths import runs_dir
    from tests.conftest import error_lines, inv

    notebook = tmp_path / "broken.ipynb"
    notebook.write_text(text)
    before = set(runs_dir().glob("*-migrate")) | set(runs_dir().glob("*-pipeline"))
    for args in (["migrate"], ["pipeline", "production", "staging"]):
        proc = inv(*args, "--notebook", str(notebook))
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, args
        assert error_lines(proc)[0].startswith(f"drydock: error: {notebook} is not a notebook papermill can read ("), args
    assert set(runs_dir().glob("*-migrate")) | set(runs_dir().glob("*-pipeline")) == before  # no run was started


@pytest.mark.parametrize("name, ok", [("before_notebook", True), ("a" * 30, True), ("a" * 31, False), ("a-b", False),
                                      ("Bad", False), ("semi;colon", False), ("a\n", False), ("", False)])
def test_snapshot_names(name, ok):
    if ok:
        assert validate.snapshot_name(name) == name
    else:
        with pytest.raises(InvalidInput, match="invalid snapshot name"):
            validate.snapshot_name(name)


@pytest.mark.parametrize("args", [["push", "--help"], ["site", "local", "-h"]])
def test_help_after_a_task_is_never_taken_for_its_argument(args):
    from tests.conftest import error_lines, inv

    proc = inv(*args)
    assert proc.returncode == 1 and error_lines(proc) == [
        "drydock: error: --help after a task is read as its argument: put it before the task's name (./inv --help TASK)"]


@pytest.mark.parametrize("args", [["pipeline", "--help"], ["pipeline", "production", "staging", "-h"]])
def test_the_wrapper_shows_a_tasks_help_written_after_it(args):
    """Invoke would read --help as the pipeline's source and fail on its missing target."""
    from tests.conftest import ROOT

    proc = subprocess.run([str(ROOT / "inv"), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ./inv [--core-opts] pipeline [--options]") and "--allow-lost-writes" in proc.stdout


def test_no_task_takes_a_one_letter_flag():
    """Invoke would make `push -o` mean --allow-older-schema: options go by their whole names."""
    from tests.conftest import error_lines, inv

    proc = inv("push", "staging", "-o")
    assert proc.returncode == 1 and error_lines(proc) == ["drydock: error: '-o' is neither an option of push nor a task"
                                                         " (./inv --help push lists its options, ./inv --list the tasks)"]
    listing = inv("--help", "site", check=True).stdout
    assert "--hostname" in listing and "-h," not in listing and "-p," not in listing


@pytest.mark.parametrize("url, ok", [
    ("postgresql://wagtail_site@db:5432/wagtail_site?passfile=/srv/site/.pgpass", True),
    ("postgresql:///wagtail_site?host=/var/run/postgresql", True),
    ("postgresql://{{ app_user }}:{{ vault_password }}@db/site", True),  # templated: the playbooks' guard reads it
    ("postgresql://wagtail_site:s3cret@db/wagtail_site", False),
    ("postgresql://db/wagtail_site?user=w&password=s3cret", False),
    ("postgresql://db/wagtail_site?pass%77ord=s3cret", False),  # libpq decodes the name too
    ("postgresql://db/wagtail_site?sslpassword=key", False)])
def test_an_app_url_with_a_password_is_refused(url, ok):
    if ok:
        assert validate.app_database_url(url) == url
    else:
        with pytest.raises(validate.InvalidInput, match="drydock_app_database_url holds a password"):
            validate.app_database_url(url)


@pytest.mark.parametrize("url", ["postgresql://db/wagtail_site?dbname=other", "postgresql://db/wagtail_site?x=1&db%6Eame=o",
                                 "postgresql://db/wagtail_site?service=site"])
def test_an_app_url_whose_parameters_name_a_database_is_refused(url):
    with pytest.raises(validate.InvalidInput, match="has a dbname= or service= parameter"):
        validate.app_database_url(url)


@pytest.mark.parametrize("url", ["postgresql://[::1/wagtail_site", "postgresql://db:99999/wagtail_site",
                                 "postgresql://app:s3cr/et@db/wagtail_site", "postgresql://app:s3cr?et@db/wagtail_site",
                                 "postgresql://app:s3@cret@db/wagtail_site", "host=db dbname=wagtail_site password=s3cret",
                                 "postgresql://app:2024/s3cret@db/wagtail_site", "postgresql://app:12?s3cret@db/site",
                                 "postgresql://db/wagtail_site?passfile=/x#&password=s3cret"])
def test_an_app_url_that_does_not_parse_is_one_line_that_quotes_none_of_it(url):
    """A password with an unencoded / or ? puts a piece of it where the port goes: Python's
    error would quote that piece. A key=value DSN is no URL, and its password no check sees;
    nor a password= after a #, which libpq reads but urlsplit's query leaves out."""
    with pytest.raises(validate.InvalidInput) as refused:
        validate.app_database_url(url)
    assert str(refused.value) == validate.NOT_A_URL


@pytest.mark.parametrize("variable, ok", [("DATABASE_URL", True), ("_SITE_DB2", True), ("{{ site_db_var }}", True),
                                          ("2DB", False), ("DATABASE_URL=x; touch /tmp/p; X", False), ("", False)])
def test_the_app_url_variable_must_be_a_name(variable, ok):
    url = "postgresql://db/wagtail_site"
    if ok:
        assert validate.app_database_url(url, variable) == url
    else:
        with pytest.raises(validate.InvalidInput, match="must be an environment variable's name"):
            validate.app_database_url(url, variable)


def test_a_pipeline_refuses_a_password_in_the_app_url_before_it_backs_up_anything(tmp_path):
    """The migration step refuses it too, but a pipeline would have backed up and pulled first."""
    from tests.conftest import error_lines, inv

    from drydock.inventory import HOST_VARIABLES

    described = {name: "x" for name in HOST_VARIABLES}  # the environments pass, as they are checked first
    local = {**described, "ansible_connection": "local",
             "drydock_app_database_url": "postgresql://wagtail_site:s3cret@localhost/wagtail_site"}
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(json.dumps({"all": {"children": {  # JSON is YAML
        "drydock_servers": {"hosts": {"production": described, "staging": described}},
        "drydock_local": {"hosts": {"local": local}}}}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRYDOCK_INVENTORY", str(hosts))
        patch.setenv("DRYDOCK_RUNS", str(tmp_path / "runs"))  # its own: no other run shows there
        proc = inv("pipeline", "production", "staging", "--yes")
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert error_lines(proc)[0].startswith("drydock: error: drydock_app_database_url holds a password")
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "runs").glob("*-pipeline"))  # no run was started


@pytest.mark.parametrize("servers, local, bad", [(("production", "staging"), "laptop.lan", "laptop.lan"),
                                                 (("Prod", "staging"), "local", "Prod")])
def test_a_host_whose_name_cannot_be_an_environment_is_refused_before_anything_runs(tmp_path, servers, local, bad):
    """pg_backup's preflight refuses it as well, but in a pull only after production was dumped,
    and a server named `Prod` could never be typed on the command line."""
    from tests.conftest import described_inventory, error_lines, inv

    hosts = described_inventory(tmp_path, servers, local)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRYDOCK_INVENTORY", str(hosts))
        patch.setenv("DRYDOCK_RUNS", str(tmp_path / "runs"))
        proc = inv("pull", "staging")
    assert proc.returncode == 1 and error_lines(proc) == [
        f"drydock: error: the inventory's host {bad!r} cannot be an environment: an environment is named in "
        "lower-case letters, digits, - and _, starting with a letter (at most 32); rename it (its address goes "
        "in ansible_host)"]
    assert not list((tmp_path / "runs").glob("*-pull"))  # no run was started


@pytest.mark.parametrize("variable", ["DRYDOCK_RUNS", "DRYDOCK_BACKUPS"])
def test_a_file_named_as_drydocks_folder_is_refused_in_one_line(tmp_path, variable):
    """Not a traceback, nor a failure after the host has dumped its database."""
    from tests.conftest import error_lines, inv

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(variable, str(a_file))
        proc = inv("backup", "production")
    assert proc.returncode == 1 and error_lines(proc) == [
        f"drydock: error: {variable}={a_file} is not a folder: drydock keeps its "
        f"{'runs and locks' if variable == 'DRYDOCK_RUNS' else 'backups'} there; name a folder (it is made if missing)"]


@pytest.mark.parametrize("variable", ["DRYDOCK_RUNS", "DRYDOCK_BACKUPS"])
def test_a_folder_every_user_may_write_to_is_refused_and_keeps_its_mode(tmp_path, variable):
    """DRYDOCK_RUNS=/tmp, say: drydock would make it 0700 and drop its sticky bit."""
    from tests.conftest import error_lines, inv

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(variable, str(shared))
        proc = inv("backup", "production")
    assert proc.returncode == 1 and error_lines(proc) == [
        f"drydock: error: {variable}={shared} is a folder every user may write to: drydock keeps its "
        f"{'runs and locks' if variable == 'DRYDOCK_RUNS' else 'backups'} there, private (0700); name a folder "
        "of its own (it is made if missing)"]
    assert (oct(stat.S_IMODE(shared.stat().st_mode)), list(shared.iterdir())) == ("0o1777", [])


# The controller checks what it is given before anything runs (drydock/validate.py); the
# playbooks check the same again, for an operator who runs them with plain ansible-playbook
# (app_url_guard, wagtail_site's preflight). The rules are written twice, in Python and in
# Jinja: these cases go through both, the playbooks' in one real ansible-playbook run.
URL_CASES = [
    ("postgresql://wagtail_site@db:5432/wagtail_site?passfile=/srv/site/.pgpass", "DATABASE_URL"),
    ("postgresql:///wagtail_site?host=/var/run/postgresql", "SITE_DB"),
    ("postgresql://wagtail_site:s3cret@db/wagtail_site", "DATABASE_URL"),
    ("postgresql://:s3cret@db/wagtail_site", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?user=w&password=s3cret", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?pass%77ord=s3cret", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?sslpassword=key", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?mypassword=x", "DATABASE_URL"),  # not libpq's: allowed by both
    ("postgresql://db/wagtail_site?dbname=other", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?x=1&db%6Eame=o", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?service=site", "DATABASE_URL"),
    ("postgresql://db/wagtail_site?sslmode=require&target_session_attrs=any", "_SITE_DB2"),
    ("postgresql://db/wagtail_site", "2DB"),
    ("postgresql://db/wagtail_site", "DATABASE_URL=x; touch /tmp/p; X"),
    ("postgresql://db/wagtail_site", "DATABASE_URL\n"),
    ("postgresql://db/wagtail_site", ""),
    ("postgresql://w:s3cret@db/wagtail_site?dbname=o", "bad name"),  # every rule broken: the first one named
    ("postgresql://db/wagtail_site?dbname=o", "bad name"),
    ("postgresql://app:s3cr/et@db/wagtail_site", "DATABASE_URL"),  # the port would be "s3cr"
    ("postgresql://app:2024/s3cret@db/wagtail_site", "DATABASE_URL"),  # host app, port 2024, no password seen
    ("postgresql://app:12?s3cret@db/wagtail_site", "DATABASE_URL"),
    ("postgresql://app:s3@cret@db/wagtail_site", "DATABASE_URL"),
    ("host=db dbname=wagtail_site password=s3cret", "DATABASE_URL"),
    ("postgresql://[::1]:5432/wagtail_site", "DATABASE_URL"),
]
# URLs that do not parse: both refuse them, the guard for the port beyond 65535 in Ansible's words.
UNPARSABLE_URLS = ["postgresql://db:99999/wagtail_site", "postgresql://h1:5432,h2:5433/wagtail_site",
                   "postgresql://[::1/wagtail_site",
                   # libpq reads on past a #: urlsplit's query, which the password check reads, ends there
                   "postgresql://db/wagtail_site?passfile=/x#&password=s3cret", "postgresql://db/wagtail_site#x"]
HOSTNAME_CASES = ["localhost", "www.drydock-example.org", "Preview.Example.ORG", "a" * 63 + ".com", "",
                  "bad host", "x';--", "-a.com", "a-.com", "a..b", "a" * 64 + ".com", "under_score.com",
                  "host:8000", "ümlaut.de", "example.org\n", ".".join(["a" * 63] * 4) + ".com"]

PARITY_PLAYBOOK = """\
- name: Put each case through the playbooks' own checks
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Check each URL and variable name
      ansible.builtin.include_tasks: url_case.yml
      loop: "{{ url_cases }}"
      loop_control: {loop_var: case}
    - name: Check each hostname
      ansible.builtin.include_tasks: hostname_case.yml
      loop: "{{ hostname_cases }}"
      loop_control: {loop_var: case}
    - name: Write down the verdicts
      ansible.builtin.copy:
        content: "{{ {'url': url_verdicts, 'hostname': hostname_verdicts} | to_json }}"
        dest: "{{ verdicts_file }}"
        mode: "0600"
"""
CASE_TASKS = """\
- name: Check one case
  block:
    - name: Run the check
      ansible.builtin.include_role:
        name: {role}
        tasks_from: {tasks}
      vars: {vars}
    - name: Note that it passed
      ansible.builtin.set_fact:
        {key}_verdicts: "{{{{ {key}_verdicts | default([]) + [none] }}}}"
  rescue:
    - name: Note why it was refused
      ansible.builtin.set_fact:
        {key}_verdicts: "{{{{ {key}_verdicts | default([]) + [ansible_failed_result.msg] }}}}"
"""


def _library_module(name: str, monkeypatch):
    """One of drydock's modules, imported as Ansible would run it (its module_utils under ansible.module_utils)."""
    import importlib.util
    import sys

    import drydock_pg
    from drydock.paths import project_root

    monkeypatch.setitem(sys.modules, "ansible.module_utils.drydock_pg", drydock_pg)
    spec = importlib.util.spec_from_file_location(name, project_root() / "library" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _verdict(check, *args) -> str | None:
    try:
        check(*args)
    except InvalidInput as error:
        return str(error)
    return None


def test_the_controller_and_the_playbooks_refuse_the_same_urls_and_hostnames_with_the_same_words(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from drydock.paths import project_root
    from drydock.playbook import ansible_env

    (tmp_path / "parity.yml").write_text(PARITY_PLAYBOOK)
    (tmp_path / "url_case.yml").write_text(CASE_TASKS.format(
        role="app_url_guard", tasks="main", key="url",
        vars="{app_url_guard_url: '{{ case[0] }}', app_url_guard_env: '{{ case[1] }}'}"))
    (tmp_path / "hostname_case.yml").write_text(CASE_TASKS.format(
        role="wagtail_site", tasks="preflight", key="hostname",
        vars="{wagtail_site_hostname: '{{ case }}', wagtail_site_port: 443}"))
    (tmp_path / "cases.json").write_text(json.dumps({
        "url_cases": URL_CASES + [(url, "DATABASE_URL") for url in UNPARSABLE_URLS], "hostname_cases": HOSTNAME_CASES,
        "verdicts_file": str(tmp_path / "verdicts.json")}))
    proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", "-e", f"@{tmp_path / 'cases.json'}",
                           "-e", f"ansible_python_interpreter={sys.executable}",
                           str(tmp_path / "parity.yml")], cwd=project_root(), env=ansible_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    playbooks = json.loads((tmp_path / "verdicts.json").read_text())

    controller = [_verdict(validate.app_database_url, url, variable) for url, variable in URL_CASES]
    assert playbooks["url"][:len(URL_CASES)] == controller
    assert controller.count(None) == 5  # the cases do test both ways
    assert "s3cr" not in json.dumps(playbooks["url"])  # not even the piece a / cut off
    for url, refused in zip(UNPARSABLE_URLS, playbooks["url"][len(URL_CASES):]):
        assert refused and _verdict(validate.app_database_url, url) == validate.NOT_A_URL, url

    hostname_module = _library_module("drydock_site", monkeypatch)  # the module that writes the Site checks it a third time
    for name, refused in zip(HOSTNAME_CASES, playbooks["hostname"]):
        by_controller = _verdict(validate.hostname, name)
        assert (refused is None) == (by_controller is None) == bool(hostname_module.HOSTNAME.match(name)), name
        if refused:
            assert refused == f"invalid Site hostname {json.dumps(name)} or port \"443\"", name
    assert playbooks["hostname"].count(None) == 4
