#!/usr/bin/python
"""Ansible module: put a fully restored side database in place of the live one."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_db_swap
short_description: Swap a side database in for the live one by renaming, keeping the old one
description:
  - Blocks new connections to the live database, terminates its sessions, then renames
    live to C(previous) and C(incoming) to live in one transaction: either both renames
    happen or neither does. Takes milliseconds whatever the size.
  - An existing database named C(previous) (the generation before) is renamed aside in the
    same transaction and dropped only once the swap has succeeded.
  - When the live database does not exist yet, C(incoming) is simply renamed.
  - Connects to the C(postgres) maintenance database over the local socket as the current
    OS user (peer authentication).
options:
  database: {description: The live database name., type: str, required: true}
  incoming: {description: The side database holding the new content., type: str, required: true}
  previous: {description: The name the old live database is kept under., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
"""

EXAMPLES = r"""
- name: Swap the restored copy in
  drydock_db_swap:
    database: wagtail_site
    incoming: wagtail_site__incoming
    previous: wagtail_site__previous
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
previous: {description: Name of the old live database, or null when there was none., type: str, returned: success}
terminated: {description: Sessions terminated on the live database., type: int, returned: success}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import HAS_PSYCOPG, connect


def exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(database=dict(type="str", required=True), incoming=dict(type="str", required=True),
                           previous=dict(type="str", required=True), socket_dir=dict(type="path", required=True),
                           port=dict(type="int", default=5432)),
        supports_check_mode=True,
    )
    p = module.params
    if len({p["database"], p["incoming"], p["previous"]}) != 3:
        module.fail_json(msg="database, incoming and previous must be three different names")
    if not HAS_PSYCOPG:
        module.fail_json(msg="psycopg (3) is not importable by this host's Python (Debian: apt install python3-psycopg)")
    import psycopg
    from psycopg import sql

    aside_name = p["previous"][:57] + "__old"  # the generation before, until the swap succeeded
    live, incoming, previous, aside = (sql.Identifier(n) for n in
                                       (p["database"], p["incoming"], p["previous"], aside_name))
    terminated = 0
    try:
        with connect(p["socket_dir"], p["port"], "postgres", autocommit=True) as conn:
            if not exists(conn, p["incoming"]):
                module.fail_json(msg=f"nothing to swap in: database {p['incoming']} does not exist")
            has_live, has_previous = exists(conn, p["database"]), exists(conn, p["previous"])
            if module.check_mode:
                module.exit_json(changed=True, previous=p["previous"] if has_live else None, terminated=0)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(aside))  # left by a crash
            blocked = [name for name, there in ((p["database"], has_live), (p["previous"], has_previous)) if there]
            for name in blocked:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
            try:
                for name in blocked:
                    terminated += conn.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
                # All renames in one transaction: either the swap happened or nothing did.
                with conn.transaction():
                    if has_previous:
                        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(previous, aside))
                    if has_live:
                        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(live, previous))
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(incoming, live))
            finally:
                # Whichever database now carries each name accepts connections again.
                for name in (p["database"], p["previous"], aside_name):
                    if exists(conn, name):
                        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
            # Only now is the older generation no longer needed.
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(aside))
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    module.exit_json(changed=True, previous=p["previous"] if has_live else None, terminated=terminated)


if __name__ == "__main__":
    main()
