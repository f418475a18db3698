#!/usr/bin/env python3
"""Ansible inventory of the sandbox world, read from `.sandbox/` (written by `inv sandbox.up`).

production and staging are in `drydock_servers` (reached over SSH when the sandbox runs
sshd), local is in `drydock_local`. The per-environment facts are the same `drydock_*`
variables a real inventory sets (see inventories/example/).
"""
import json
import sys
from pathlib import Path

SANDBOX = Path(__file__).resolve().parent.parent.parent / ".sandbox"
SERVERS = ("production", "staging")
APP_PORT = 8000


def host_vars(name: str, env: dict, conn: dict) -> dict:
    server = name in SERVERS
    hv = {
        "ansible_host": env["host"],
        "ansible_python_interpreter": conn["python"],
        "drydock_env": name,
        "drydock_db_name": env["database"],
        "drydock_db_port": env["port"],
        "drydock_db_socket_dir": env["socket_dir"],
        "drydock_db_os_user": env["os_user"],
        "drydock_db_app_role": env["app_role"],
        "drydock_site_hostname": env["site_hostname"],
        "drydock_site_port": env["site_port"],
        "drydock_host_backup_dir": env["backup_dir"],
    }
    if "pg_bindir" in env:  # a sandbox built before it was recorded: the roles' default
        hv["drydock_pg_bindir"] = env["pg_bindir"]
    if not server:
        # The example site is the app the migration step runs (in drydock's own venv).
        app_dir = SANDBOX.parent / "examples" / "wagtail_site"
        hv.update(drydock_app_dir=str(app_dir), drydock_app_python=conn["python"],
                  drydock_app_settings="wagtail_site.settings", drydock_app_database_url=env["url"])
    if server:
        # The example site runs on each server as its app service (see `inv sandbox.up`).
        script = SANDBOX / name / "app-service"
        hv.update(drydock_app_stop_command=[str(script), "stop"], drydock_app_start_command=[str(script), "start"],
                  drydock_app_health_url=f"http://{env['host']}:{APP_PORT}/healthz",
                  drydock_app_url=f"http://{env['host']}:{APP_PORT}/",
                  # Pushing here needs a typed confirmation and a fresh backup.
                  drydock_protected=name == "production")
    if server and conn["connection"] == "ssh":
        hv.update(
            ansible_connection="ssh",
            ansible_port=conn["ssh_port"],
            ansible_user=conn["ssh_user"],
            ansible_ssh_private_key_file=conn["ssh_key"],
            ansible_ssh_common_args=f"-o UserKnownHostsFile={conn['known_hosts']} -o IdentitiesOnly=yes",
        )
    else:
        hv["ansible_connection"] = "local"
    if conn["become"]:  # running as root: database work happens as the clusters' OS user
        hv.update(ansible_become_method=conn.get("become_method", "ansible.builtin.su"), drydock_db_become=True)
    else:
        hv["drydock_db_become"] = False
    return hv


def main() -> None:
    if "--host" in sys.argv:
        print("{}")
        return
    names = (*SERVERS, "local")
    try:
        envs = json.loads((SANDBOX / "env.json").read_text())
        conn = json.loads((SANDBOX / "connection.json").read_text())
        hostvars = {name: host_vars(name, envs[name], conn) for name in names}
    except FileNotFoundError:
        # The sandbox is down: the hosts exist, but every play's preflight says so.
        hostvars = {name: {"ansible_connection": "local", "drydock_sandbox_down": True} for name in names}
    print(json.dumps({
        "_meta": {"hostvars": hostvars},
        "all": {"children": ["drydock_servers", "drydock_local"]},
        "drydock_servers": {"hosts": list(SERVERS)},
        "drydock_local": {"hosts": ["local"]},
    }, indent=2))


if __name__ == "__main__":
    main()
