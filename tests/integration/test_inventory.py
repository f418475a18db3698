"""A site's own inventory, written from inventories/example as its comments say, drives
drydock: YAML with group_vars and host_vars, read through DRYDOCK_INVENTORY, with values
templated as a real inventory templates them. The sandbox's servers stand in for real ones,
reached the way the sandbox inventory reaches them."""
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from drydock.playbook import ansible_env
from tests.conftest import ROOT, error_lines, inv, row_counts

SITE = "SELECT hostname, port FROM wagtailcore_site WHERE is_default_site"
# How the sandbox's hosts are reached: what a real inventory says differently for each site.
CONNECTION = ("ansible_connection", "ansible_host", "ansible_port", "ansible_user", "ansible_ssh_private_key_file",
              "ansible_ssh_common_args")
# The sandbox has no systemd: its app service is a script, named by these instead of a unit.
APP_COMMANDS = ("drydock_app_stop_command", "drydock_app_start_command")
# Values a site's inventory writes once, in group_vars, with a template.
TEMPLATED = {"app_name": "wagtail_site",
             "drydock_db_name": "{{ app_name }}",
             "drydock_db_app_role": "{{ app_name }}",
             "drydock_db_socket_dir": "{{ sandbox_dir }}/{{ inventory_hostname }}/run",
             "drydock_host_backup_dir": "{{ sandbox_dir }}/{{ inventory_hostname }}/backups",
             "drydock_protected": "{{ inventory_hostname == 'production' }}"}


def sandbox_hostvars() -> dict:
    """Each host's variables as the sandbox inventory gives them."""
    env = {name: value for name, value in ansible_env().items() if name != "ANSIBLE_INVENTORY"}
    listed = subprocess.run(["ansible-inventory", "--list"], env=env, cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return json.loads(listed.stdout)["_meta"]["hostvars"]


def written_from_the_example(folder: Path, sandbox_dir: Path) -> Path:
    """inventories/example copied to `folder` and filled in for the sandbox's hosts: each value
    the example sets is the sandbox's, apart from TEMPLATED and staging's Site, which are
    templates; the sandbox's connection is added, and its app commands replace the unit. What
    the example lacks stays missing: a variable the playbooks need would fail the commands."""
    shutil.copytree(ROOT / "inventories" / "example", folder)
    sandbox = sandbox_hostvars()

    def load(name: str) -> dict:
        return yaml.safe_load((folder / name).read_text())

    def save(name: str, values: dict) -> None:
        (folder / name).write_text(yaml.safe_dump(values, sort_keys=False))

    hosts = load("hosts.yml")
    groups = hosts["all"]["children"]
    for group in groups.values():
        for host in group["hosts"]:
            group["hosts"][host] = {name: sandbox[host][name] for name in CONNECTION if name in sandbox[host]}
    save("hosts.yml", hosts)
    shared = load("group_vars/all.yml")
    for name in shared:
        values = {json.dumps(sandbox[host].get(name)) for host in sandbox}
        assert len(values) == 1 or name in TEMPLATED, f"the sandbox's hosts differ in {name}"
        shared[name] = sandbox["local"].get(name, shared[name])
    shared.update(TEMPLATED, sandbox_dir=str(sandbox_dir))
    save("group_vars/all.yml", shared)
    for host in sandbox:
        own = load(f"host_vars/{host}.yml")
        own = {name: sandbox[host].get(name, value) for name, value in own.items()
               if name not in TEMPLATED and name != "drydock_app_service_unit"}
        own.update({name: sandbox[host][name] for name in APP_COMMANDS if name in sandbox[host]})
        if host == "staging":
            assert sandbox[host]["drydock_site_hostname"] == "staging.drydock-example.org"
            own["drydock_site_hostname"] = "{{ inventory_hostname }}.drydock-example.org"
        save(f"host_vars/{host}.yml", own)
    return folder


def test_an_inventory_written_from_the_example_pulls_and_pushes(sandbox_env, connect, tmp_path, monkeypatch):
    sandbox_dir = Path(sandbox_env["local"]["socket_dir"]).parent.parent
    monkeypatch.setenv("DRYDOCK_INVENTORY", str(written_from_the_example(tmp_path / "mysite", sandbox_dir)))

    pull = inv("pull", "production", check=True)
    assert row_counts(connect("local")) == row_counts(connect("production"))
    # The summary names the database and the Site as the playbooks rendered them.
    assert "local database wagtail_site now holds production's dump of " in pull.stdout
    assert "; Site localhost:8000; " in pull.stdout and "{{" not in pull.stdout

    # Staging is not protected, production is: no name to type here, but there.
    refused = inv("push", "production")
    assert refused.returncode == 1
    assert error_lines(refused) == ["drydock: error: refusing to push to production without confirmation: "
                                    "not interactive, pass --yes"]
    # Staging may have applied migrations of a copy an earlier test pushed.
    push = inv("push", "staging", "--allow-older-schema", check=True)
    assert ("Site staging.drydock-example.org:443); its previous database is kept as wagtail_site__previous "
            "(inv rollback staging)") in push.stdout.splitlines()[-1]
    assert connect("staging").execute(SITE).fetchone() == ("staging.drydock-example.org", 443)
    # Its lines, not its verdict: a copy of production may lack migrations the code has.
    report = inv("verify", "staging").stdout
    assert "verify staging (wagtail_site): " in report
    assert "live database: wagtail_site " in report and "pushed from local's dump " in report

    # The Site's port, when not given, is the inventory's for that environment.
    site = inv("site", "staging", "staging.drydock-example.org", check=True)
    assert site.stdout.splitlines()[-1] == ("staging: Site (default) is now staging.drydock-example.org:443 "
                                            "(it was already so: nothing changed)")


def test_a_template_that_cannot_be_rendered_is_refused_in_one_line_before_anything_runs(sandbox_env, tmp_path,
                                                                                       monkeypatch):
    sandbox_dir = Path(sandbox_env["local"]["socket_dir"]).parent.parent
    inventory = written_from_the_example(tmp_path / "mysite", sandbox_dir)
    shared = yaml.safe_load((inventory / "group_vars" / "all.yml").read_text())
    del shared["app_name"]
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(shared))
    monkeypatch.setenv("DRYDOCK_INVENTORY", str(inventory))
    runs = ROOT / "runs"
    runs_before = set(runs.iterdir()) if runs.exists() else set()

    backup = inv("backup", "production")
    assert backup.returncode == 1
    [line] = error_lines(backup)
    assert line.startswith("drydock: error: cannot render the inventory's drydock_db_name, drydock_protected, "
                           "drydock_site_hostname: "), line
    assert line.endswith("'app_name' is undefined"), line
    assert (set(runs.iterdir()) if runs.exists() else set()) == runs_before  # no run began
