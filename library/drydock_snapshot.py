#!/usr/bin/python
"""Ansible module: template-database snapshots of a database (save, restore, delete, list)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_snapshot
short_description: Save, restore, delete and list template-database snapshots
description:
  - A snapshot of database C(db) named C(name) is the database C(db__snap_name), made with
    C(CREATE DATABASE ... TEMPLATE db STRATEGY FILE_COPY) (the fastest copy PostgreSQL 15
    has). Its comment records the source and the time; it accepts no connections, so it
    stays exactly as saved.
  - Restore copies the snapshot into C(db__incoming) and swaps it in by renaming; the
    replaced database is kept as C(db__previous). A snapshot of another database is refused.
  - Sessions on the databases involved are terminated first.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  action:
    description:
      - What to do. C(copy) makes a working copy C(db__name) that accepts connections and keeps
        the source's drydock record (lineage), e.g. the outgoing copy a push scrubs and dumps.
    type: str
    required: true
    choices: [save, restore, delete, list, copy]
  database: {description: The database the snapshots are of., type: str, required: true}
  name: {description: "Snapshot name: lower-case letters, digits and _ (at most 30); not for list.", type: str}
  force: {description: With save, replace an existing snapshot of that name., type: bool, default: false}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
"""

EXAMPLES = r"""
- name: Snapshot the local database before a migration
  drydock_snapshot:
    action: save
    database: wagtail_site
    name: before_step
    force: true
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
snapshot: {description: Database name of the snapshot., type: str, returned: save, restore, delete}
snapshots: {description: "Every snapshot: name, database, source, size (bytes), created.", type: list, returned: list}
"""

import json
import re
from datetime import datetime, timezone

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (require_psycopg, connect, database_comment, database_exists,
                                             set_allow_connections, set_database_comment, swap_in,
                                             terminate_sessions)

NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,29}\Z")
SEPARATOR = "__snap_"


class SnapshotError(Exception):
    pass


def snapshot_db(database: str, name: str) -> str:
    return f"{database}{SEPARATOR}{name}"


def list_snapshots(conn) -> list[dict]:
    rows = conn.execute(
        "SELECT datname, pg_database_size(oid), shobj_description(oid, 'pg_database') FROM pg_database"
        " WHERE strpos(datname, %s) > 0 ORDER BY datname", (SEPARATOR,)).fetchall()
    snapshots = []
    for datname, size, comment in rows:
        source, name = datname.split(SEPARATOR, 1)
        try:
            meta = json.loads(comment or "{}")
        except ValueError:
            meta = {}
        # The comment is the record; the name is the fallback (e.g. the pull's pre_pull snapshot).
        snapshots.append({"name": meta.get("drydock_snapshot", name), "database": datname,
                          "source": meta.get("source", source),
                          "size": size, "created": meta.get("created")})
    return snapshots


def template_copy(conn, source: str, target: str) -> None:
    """CREATE DATABASE target as a file copy of source, owned like it. A template must have
    no other sessions while it is copied: connections are blocked and ended meanwhile."""
    sql = psycopg_sql()
    owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (source,)).fetchone()[0]
    set_allow_connections(conn, source, False)
    try:
        terminate_sessions(conn, source)
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} STRATEGY FILE_COPY").format(
            sql.Identifier(target), sql.Identifier(source), sql.Identifier(owner)))
    finally:
        set_allow_connections(conn, source, True)


def save(conn, database: str, name: str, force: bool) -> str:
    sql = psycopg_sql()
    target = snapshot_db(database, name)
    if not database_exists(conn, database):
        raise SnapshotError(f"database {database} does not exist")
    if database_exists(conn, target):
        if not force:
            raise SnapshotError(f"snapshot {name} of {database} exists already: delete it, or replace it with --force")
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(target)))
    template_copy(conn, database, target)
    set_database_comment(conn, target, {
        "drydock_snapshot": name, "source": database, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lineage": database_comment(conn, database).get("drydock_lineage")})
    set_allow_connections(conn, target, False)  # nobody changes a snapshot
    return target


def copy(conn, database: str, name: str) -> str:
    """A working copy <database>__<name>, replacing an older one; keeps the drydock record."""
    sql = psycopg_sql()
    target = f"{database}__{name}"
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target)))
    template_copy(conn, database, target)
    set_database_comment(conn, target, database_comment(conn, database) or None)
    return target


def find(conn, database: str, name: str) -> dict:
    matches = [s for s in list_snapshots(conn) if s["name"] == name]
    mine = [s for s in matches if s["source"] == database and s["database"] == snapshot_db(database, name)]
    if mine:
        return mine[0]
    if matches:
        raise SnapshotError(f"snapshot {name} was taken of database {matches[0]['source']}, not {database}: refusing to restore it over {database}")
    raise SnapshotError(f"no snapshot {name} of {database}")


def restore(conn, database: str, name: str) -> str:
    sql = psycopg_sql()
    snapshot = find(conn, database, name)["database"]
    incoming = f"{database}__incoming"
    owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (snapshot,)).fetchone()[0]
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(incoming)))
    terminate_sessions(conn, snapshot)
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} STRATEGY FILE_COPY").format(
        sql.Identifier(incoming), sql.Identifier(snapshot), sql.Identifier(owner)))
    # The restored database carries the lineage its source had when the snapshot was taken.
    record = database_comment(conn, snapshot)
    lineage = record.get("lineage") or record.get("drydock_lineage")  # a snapshot's, or a renamed database's
    set_database_comment(conn, incoming, {"drydock_lineage": lineage} if lineage else None)
    set_allow_connections(conn, incoming, True)
    swap_in(conn, database, incoming, f"{database}__previous")
    return snapshot


def delete(conn, database: str, name: str) -> str:
    sql = psycopg_sql()
    snapshot = find(conn, database, name)["database"]
    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(snapshot)))
    return snapshot


def psycopg_sql():
    from psycopg import sql

    return sql


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(action=dict(type="str", required=True, choices=["save", "restore", "delete", "list", "copy"]),
                           database=dict(type="str", required=True), name=dict(type="str"),
                           force=dict(type="bool", default=False), socket_dir=dict(type="path", required=True),
                           port=dict(type="int", default=5432)),
        supports_check_mode=True,
        required_if=[("action", "save", ["name"]), ("action", "restore", ["name"]), ("action", "delete", ["name"]),
                     ("action", "copy", ["name"])],
    )
    p = module.params
    if p["name"] is not None and not NAME.match(p["name"]):
        module.fail_json(msg=f"invalid snapshot name {p['name']!r}: use lower-case letters, digits and _ (at most 30)")
    require_psycopg(module)
    import psycopg

    try:
        with connect(p["socket_dir"], p["port"], "postgres", autocommit=True) as conn:
            if p["action"] == "list":
                module.exit_json(changed=False, snapshots=list_snapshots(conn))
            if module.check_mode:
                module.exit_json(changed=True, snapshot=snapshot_db(p["database"], p["name"]))
            action = {"save": lambda: save(conn, p["database"], p["name"], p["force"]),
                      "restore": lambda: restore(conn, p["database"], p["name"]),
                      "delete": lambda: delete(conn, p["database"], p["name"]),
                      "copy": lambda: copy(conn, p["database"], p["name"])}[p["action"]]
            module.exit_json(changed=True, snapshot=action())
    except SnapshotError as error:
        module.fail_json(msg=str(error))
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))


if __name__ == "__main__":
    main()
