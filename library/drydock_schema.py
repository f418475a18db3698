#!/usr/bin/python
"""Ansible module: read a database's schema and migration records, and compare them."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_schema
short_description: Read a database's schema and django_migrations, optionally compare with the code's
description:
  - Returns the public schema (tables; columns with type, nullability, default and identity;
    indexes; constraints; sequences) and every django_migrations row.
  - With C(reference), lists each schema object that differs from it; with C(code_migrations),
    lists the migrations applied but unknown to the code and those not applied. Read only.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  database: {description: Database to read., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  trusted_functions: {description: "Functions, triggers and rules of the database's own to accept, as a refusal names them; any other refuses the module before it reads a table.", type: list, elements: str, default: []}
  reference: {description: A schema returned earlier (e.g. of a database migrated from zero)., type: dict}
  code_migrations: {description: "The code's migrations as [app, name] pairs.", type: list, elements: list}
"""

EXAMPLES = r"""
- name: Compare staging's schema with the reference
  drydock_schema:
    database: wagtail_site
    socket_dir: /var/run/postgresql
    reference: "{{ reference.schema }}"
    code_migrations: "{{ code_migrations }}"
"""

RETURN = r"""
schema: {description: "The schema: {kind: {name: definition}}.", type: dict, returned: success}
applied: {description: "django_migrations rows as [app, name].", type: list, returned: success}
schema_drift: {description: One line per differing object., type: list, returned: when reference}
migration_drift: {description: One line per differing migration record., type: list, returned: when code_migrations}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (require_psycopg, APP_DATABASE_ARGS, applied_migrations, connect,
                                             migration_diff, refuse_code_of_its_own, schema_diff, schema_snapshot)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(APP_DATABASE_ARGS, reference=dict(type="dict"),
                           code_migrations=dict(type="list", elements="list")),
        supports_check_mode=True,
    )
    p = module.params
    require_psycopg(module)
    import psycopg

    try:
        with connect(p["socket_dir"], p["port"], p["database"]) as conn, conn.cursor() as cur:
            refuse_code_of_its_own(module, conn, "read")
            result = {"schema": schema_snapshot(cur), "applied": applied_migrations(cur)}
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    if p["reference"] is not None:
        result["schema_drift"] = schema_diff(p["reference"], result["schema"])
    if p["code_migrations"] is not None:
        result["migration_drift"] = migration_diff(p["code_migrations"], result["applied"])
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
