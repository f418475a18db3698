"""The environments an inventory defines: servers (production, staging, ...) and local."""
from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass

from drydock.errors import DrydockError
from drydock.lock import LOCAL as LOCAL_LOCK
from drydock.playbook import ansible_env
from drydock.validate import InvalidInput, environment_name


def as_bool(value) -> bool:
    """A safety flag from the inventory (drydock_protected, drydock_safety_backup): false only
    when it says false as the playbooks' `| bool` reads it ("false", "no", 0, ...). Anything
    else is true, a template too: `ansible-inventory --list` does not render templates, and
    a flag drydock cannot read must ask for the name rather than skip it."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("false", "no", "off", "0", "n", "f", "", "none")


@dataclass(frozen=True)
class Inventory:
    servers: tuple[str, ...]
    local: tuple[str, ...]
    hostvars: dict

    def server(self, text: str) -> str:
        """Validate a server environment typed by the user: exactly one, and known."""
        return self._one_of(text, self.servers, local=self.local)

    def protected(self, env: str) -> bool:
        """A protected environment (production) needs its name typed for any change."""
        return as_bool(self.hostvars.get(env, {}).get("drydock_protected", False))

    def lock_name(self, env: str) -> str:
        """The lock an environment's database is guarded by: the local one's is "local",
        whatever the inventory calls its host (snapshot commands read no inventory)."""
        return LOCAL_LOCK if env in self.local else env

    def environment(self, text: str) -> str:
        """Like server(), but the local environment is accepted too."""
        return self._one_of(text, self.servers + self.local)

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


@functools.lru_cache(maxsize=None)
def load() -> Inventory:
    """The inventory, read once per drydock command (ansible-inventory takes a second)."""
    proc = subprocess.run(["ansible-inventory", "--list"], env=ansible_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DrydockError(f"cannot read the inventory: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    data = json.loads(proc.stdout)
    hosts = {group: tuple(data.get(group, {}).get("hosts", [])) for group in ("drydock_servers", "drydock_local")}
    missing = [group for group, names in hosts.items() if not names]
    if missing:
        where = ansible_env().get("ANSIBLE_INVENTORY") or "inventories/sandbox (ansible.cfg)"
        raise DrydockError(f"the inventory {where} has no hosts in {' or '.join(missing)}: "
                           "is its path right? (see docs/configuration.md)")
    if LOCAL_LOCK in hosts["drydock_servers"]:  # its lock would be the local database's (drydock.lock.LOCAL)
        raise DrydockError(f"a server in drydock_servers is called {LOCAL_LOCK!r}, the name drydock gives the local "
                           "database: rename that host in the inventory")
    return Inventory(servers=hosts["drydock_servers"], local=hosts["drydock_local"],
                     hostvars=data.get("_meta", {}).get("hostvars", {}))
