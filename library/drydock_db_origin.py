#!/usr/bin/python
"""Ansible module: say which database is live and where it, and the one kept before it, came from."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_db_origin
short_description: Say where the live database and the one kept before it came from
description:
  - Reads the record drydock's swaps write on a database (its comment) for the live
    database and, when it exists, the previous generation a rollback would bring back, and
    describes each in a line, e.g. "pushed from local's dump 20261204T203908Z (a copy of
    production's backup 20261204T203843Z); live since 2026-12-04T20:39:13+00:00".
  - Connects to the live database over the local socket as the current OS user (peer
    authentication). Read only.
options:
  database: {description: The live database., type: str, required: true}
  previous: {description: "The name the previous generation is kept under (\"\": none to describe).", type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
"""

EXAMPLES = r"""
- name: Say where the live database came from
  drydock_db_origin:
    database: wagtail_site
    previous: wagtail_site__previous
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
live: {description: "The live database: name, oid and description.", type: dict, returned: success}
previous:
  description:
    - "The previous generation: name, oid and description (null when there is none)."
    - "Also C(failed_check) and C(set_aside): why a swap-back set it aside after it failed its check, and when (else null)."
  type: dict
  returned: success
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (PG_CONNECTION_ARGS, connect, database_row, describe_origin, parse_record,
                                             require_psycopg)


def swapped_back(record: dict) -> dict:
    """Why and when a swap-back set this database aside as it failed its check (else nulls)."""
    failed = record.get("set_aside_by") == "swap-back" and isinstance(record.get("failed_check"), str)
    return {"failed_check": record["failed_check"] if failed else None,
            "set_aside": record.get("set_aside") if failed else None}


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(PG_CONNECTION_ARGS, previous=dict(type="str", required=True)),
        supports_check_mode=True,
    )
    p = module.params
    require_psycopg(module)
    import psycopg

    described = {}
    try:
        # pg_database is shared: the live database (which verify reads anyway) sees both.
        with connect(p["socket_dir"], p["port"], p["database"]) as conn:
            for role, name in (("live", p["database"]), ("previous", p["previous"])):
                row = database_row(conn, name) if name else None
                if row is None:
                    described[role] = None
                    continue
                record = parse_record(row[1])
                described[role] = {"name": name, "oid": row[0],
                                   "description": describe_origin(record, live=role == "live")}
                if role == "previous":
                    described[role].update(swapped_back(record))
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    module.exit_json(changed=False, **described)


if __name__ == "__main__":
    main()
