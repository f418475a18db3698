"""The environments an inventory defines: servers (production, staging, ...) and local."""
from __future__ import annotations

import configparser
import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from drydock.errors import DrydockError
from drydock.lock import LOCAL as LOCAL_LOCK
from drydock.paths import project_root, sandbox_dir
from drydock.playbook import ansible_env, run_playbook
from drydock.validate import ENV_NAME_RULE, InvalidInput, environment_name, is_environment_name, is_template


# What Ansible's `| bool` reads, in the playbooks: any other string it takes for false (with
# a deprecation warning), so a "y" would skip production's guards there.
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def as_bool(value, name: str = "the flag") -> bool:
    """A safety flag from the inventory (drydock_protected, drydock_safety_backup), read as the
    playbooks' `| bool` reads it. load() renders a templated flag; one still a template (the
    rendered value is one again) is true: a flag drydock cannot read must ask for the name
    rather than skip it. Any other value is refused: drydock and the playbooks would read it
    differently."""
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if is_template(value):
            return True
        if value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
    raise InvalidInput(f"{name} is {value!r}: write true or false (the playbooks read only "
                       f"{'/'.join(TRUE_WORDS + FALSE_WORDS)}, and take anything else for false)")


SAFETY_FLAGS = ("drydock_protected", "drydock_safety_backup")

# The host variables drydock's own code reads, besides the playbooks: its refusals, its
# prompts and the names and Site its summary lines report. `ansible-inventory --list` prints
# a template as written ("{{ app }}__previous"), so load() has Ansible render these when one is.
READ_VALUES = SAFETY_FLAGS + ("drydock_db_name", "drydock_site_hostname", "drydock_site_port", "drydock_app_url",
                              "drydock_app_database_url", "drydock_app_database_url_env", "django_migrate_snapshot")

# The host variables the playbooks read without a default (docs/configuration.md): missing
# one, a command would fail only where its playbook first reads it, after a dump perhaps.
HOST_VARIABLES = ("drydock_env", "drydock_db_name", "drydock_db_app_role", "drydock_db_os_user", "drydock_db_become",
                  "drydock_db_port", "drydock_db_socket_dir", "drydock_host_backup_dir", "drydock_site_hostname",
                  "drydock_site_port")


@dataclass(frozen=True)
class Inventory:
    servers: tuple[str, ...]
    local: tuple[str, ...]
    hostvars: dict

    def server(self, text: str) -> str:
        """Validate a server environment typed by the user: exactly one, known, and described."""
        return self._described(self._one_of(text, self.servers, local=self.local))

    def local_env(self) -> str:
        """The local environment's name, once its host variables are there."""
        return self._described(self.local[0])

    def _described(self, env: str) -> str:
        """`env`, refused if the inventory lacks host variables the playbooks need, or is the
        sandbox's while it is down (its playbooks say so too, but only after Ansible's start
        and a run folder for a command that never began)."""
        hostvars = self.hostvars.get(env, {})
        if hostvars.get("drydock_sandbox_down"):
            raise DrydockError("the sandbox is down: run ./inv sandbox.up first")
        missing = [name for name in HOST_VARIABLES if name not in hostvars]
        if missing:
            raise DrydockError(f"{env} lacks {', '.join(missing)} in the inventory: the playbooks need "
                               f"{'them' if len(missing) > 1 else 'it'} (docs/configuration.md, host variables)")
        for flag in SAFETY_FLAGS:  # refused by every command alike, not only by those that read one
            as_bool(hostvars.get(flag, False), f"{flag} of {env}")
        return env

    def protected(self, env: str) -> bool:
        """A protected environment (production) needs its name typed for any change."""
        return as_bool(self.hostvars.get(env, {}).get("drydock_protected", False), f"drydock_protected of {env}")

    def lock_name(self, env: str) -> str:
        """The lock an environment's database is guarded by: the local one's is "local",
        whatever the inventory calls its host (snapshot commands read no inventory)."""
        return LOCAL_LOCK if env in self.local else env

    def environment(self, text: str) -> str:
        """Like server(), but the local environment is accepted too."""
        return self._described(self._one_of(text, self.servers + self.local))

    @staticmethod
    def _one_of(text: str, known: tuple[str, ...], local: tuple[str, ...] = ()) -> str:
        """The one name in `text`, if it is `known`; `local` names the local environment
        where only servers are (backups, pulls and pushes; the local database has snapshots)."""
        names = [part for part in text.replace(",", " ").replace(":", " ").split() if part]
        if len(names) != 1:
            raise InvalidInput(f"one environment at a time, got {len(names)}: {', '.join(names) or '(none)'}")
        name = environment_name(names[0])
        if name in local:
            raise InvalidInput(f"{name!r} is the local database, not a server: choose one of {', '.join(known)}")
        if name not in known:
            raise InvalidInput(f"unknown environment {name!r}: choose one of {', '.join(known)}")
        return name


def sandbox_down() -> bool:
    """Whether commands would run on the sandbox's inventory (ansible.cfg's, no other named)
    while the sandbox is down: for the snapshot commands, which read no inventory, so that
    they refuse as Inventory._described does. Down as inventories/sandbox/hosts.py has it:
    without .sandbox/env.json."""
    if ansible_env().get("ANSIBLE_INVENTORY"):
        return False
    config = configparser.ConfigParser(interpolation=None)
    config.read(project_root() / "ansible.cfg")
    return (config.get("defaults", "inventory", fallback="") == "inventories/sandbox"
            and not (sandbox_dir() / "env.json").exists())


@functools.lru_cache(maxsize=None)
def load() -> Inventory:
    """The inventory, read once per drydock command (ansible-inventory takes a second)."""
    # DRYDOCK_INVENTORY is one path, resolved from the project's folder: a missing one, Ansible
    # would only warn about, then find no hosts.
    env = ansible_env()
    if os.environ.get("DRYDOCK_INVENTORY") and not Path(env["ANSIBLE_INVENTORY"]).exists():
        raise DrydockError(f"no inventory at {env['ANSIBLE_INVENTORY']} (DRYDOCK_INVENTORY="
                           f"{os.environ['DRYDOCK_INVENTORY']}, read from the project's folder)")
    # Quiet whatever ANSIBLE_VERBOSITY the operator set for the playbooks: at 1 and above,
    # ansible-inventory writes its own lines into the JSON it prints.
    proc = subprocess.run(["ansible-inventory", "--list"], env=dict(env, ANSIBLE_VERBOSITY="0"),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise DrydockError(f"cannot read the inventory: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    data = json.loads(proc.stdout)
    hosts = {group: tuple(data.get(group, {}).get("hosts", [])) for group in ("drydock_servers", "drydock_local")}
    missing = [group for group, names in hosts.items() if not names]
    if missing:
        where = env.get("ANSIBLE_INVENTORY") or "inventories/sandbox (ansible.cfg)"
        raise DrydockError(f"the inventory {where} has no hosts in {' or '.join(missing)}: "
                           "is its path right? (see docs/configuration.md)")
    for name in hosts["drydock_servers"] + hosts["drydock_local"]:
        # Every host's name is an environment's: a folder under backups/ and a word on the command
        # line (a server's, its lock's too). The playbooks refuse a bad one, but only once a pull dumped.
        if not is_environment_name(name):
            raise DrydockError(f"the inventory's host {name!r} cannot be an environment: {ENV_NAME_RULE}; "
                               "rename it (its address goes in ansible_host)")
    if LOCAL_LOCK in hosts["drydock_servers"]:  # its lock would be the local database's (drydock.lock.LOCAL)
        raise DrydockError(f"a server in drydock_servers is called {LOCAL_LOCK!r}, the name drydock gives the local "
                           "database: rename that host in the inventory")
    return Inventory(servers=hosts["drydock_servers"], local=hosts["drydock_local"],
                     hostvars=_rendered(data.get("_meta", {}).get("hostvars", {})))


def _rendered(hostvars: dict) -> dict:
    """`hostvars` with the templated READ_VALUES rendered by Ansible, as the playbooks render
    them (lookups, other variables, inventory_hostname). A playbook run (about a second) only
    when there is one: most inventories write these values plainly."""
    templated = {host: [name for name in READ_VALUES if is_template(values.get(name))]
                 for host, values in hostvars.items()}
    templated = {host: names for host, names in templated.items() if names}
    if not templated:
        return hostvars
    listed = ", ".join(sorted({name for names in templated.values() for name in names}))
    try:
        # No --limit: a host named like a group (production) would match that group's hosts
        # instead. The playbook's `when` skips the others, and a debug task connects nowhere.
        results = run_playbook("inventory_values.yml", capture=True, extra_vars={"drydock_value_names": templated})
        for host in templated:
            hostvars[host].update(results[host]["Render the values"]["msg"])
    except DrydockError as error:
        raise DrydockError(f"cannot render the inventory's {listed}: {error}") from error
    except (KeyError, TypeError, AttributeError) as error:
        raise DrydockError(f"cannot render the inventory's {listed}: no result for {error}") from error
    return hostvars
