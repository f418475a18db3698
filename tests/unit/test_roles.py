"""Role conventions: every variable is prefixed with its role's name, documented by a
comment in defaults/main.yml, and meta/argument_specs.yml declares the same defaults."""
from pathlib import Path

import pytest
import yaml

ROLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "roles").iterdir() if p.is_dir())


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_argument_specs_equal_defaults(role):
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    assert "main" in specs
    for entry_point, spec in specs.items():
        options = spec.get("options", {})
        assert set(options) == set(defaults), f"{role.name}:{entry_point} options differ from defaults"
        for name, option in options.items():
            assert option.get("default") == defaults[name], f"{role.name}:{entry_point}:{name}"
            assert option.get("description"), f"{role.name}:{name} has no description"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_defaults_are_prefixed_and_commented(role):
    lines = (role / "defaults" / "main.yml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith(("#", " ", "---")):
            name = line.split(":")[0]
            assert name.startswith(role.name + "_"), f"{name} is not prefixed with {role.name}_"
            previous = next(l for l in reversed(lines[:index]) if not l.startswith(" "))
            assert previous.startswith("#") or lines[index - 1].split(":")[0].startswith(role.name), \
                f"{name} in {role.name} has no comment"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_tasks_have_capitalised_names(role):
    for path in (role / "tasks").glob("*.yml"):
        for task in yaml.safe_load(path.read_text()) or []:
            assert task.get("name", "")[:1].isupper(), f"{path}: {task.get('name')!r}"


# Tasks that become root (become without become_user) on purpose: the backup folder itself,
# whose parent is root's (docs/configuration.md), and the app's systemd unit, which names no
# path. Anything else that acts on the hosts' files becomes the database's OS user: root
# would follow a link that user had put in a folder it owns.
BECOMES_ROOT = {
    ("roles/pg_backup/tasks/main.yml", "Make the host's backup folder the OS user's, 0700"),
    ("roles/pg_restore/tasks/check.yml", "Make the host's backup folder the OS user's, 0700"),
    ("roles/app_service/tasks/start.yml", "Start the app's systemd unit"),
    ("roles/app_service/tasks/stop.yml", "Stop the app's systemd unit"),
}


def _tasks(items):
    for item in items or []:
        if isinstance(item, dict):
            yield item
            for key in ("block", "rescue", "always", "tasks", "pre_tasks", "post_tasks", "handlers"):
                yield from _tasks(item.get(key))


def test_only_the_listed_tasks_become_root():
    root = Path(__file__).resolve().parents[2]
    found = set()
    for path in sorted([*root.glob("roles/*/tasks/*.yml"), *root.glob("playbooks/*.yml"),
                        *root.glob("playbooks/tasks/*.yml")]):
        for task in _tasks(yaml.safe_load(path.read_text())):
            if task.get("become") not in (None, False, "false") and "become_user" not in task:
                found.add((str(path.relative_to(root)), task.get("name")))
    assert found == BECOMES_ROOT
