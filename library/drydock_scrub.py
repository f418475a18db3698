#!/usr/bin/python
"""Ansible module: apply scrubbing rules (SQL) to a copy of a database before it leaves."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_scrub
short_description: Scrub personal data from a database copy with SQL rules, in one transaction
description:
  - Runs each rule's SQL, all in one transaction, and returns the rules that ran (C(ran)): the
    push hands them to the dump, whose manifest names them.
  - A rule whose table does not exist fails the scrubbing (a misspelt table would otherwise
    let personal data through), unless it says C(required: false): a rule for an app the
    site may not have. Scrubbing in which no rule ran fails too.
  - Meant for the outgoing copy of a push to a non-production environment; never for a live database.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  database: {description: The database copy to scrub., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  trusted_functions: {description: "Functions, triggers and rules of the database's own to accept, as a refusal names them; any other refuses the module before it runs a rule.", type: list, elements: str, default: []}
  rules:
    description:
      - "Rules: C(name), C(table) and C(sql), and C(required) (default true). A rule whose table
        does not exist fails the scrubbing, and nothing is changed, unless it says
        C(required: false): then it is skipped."
    type: list
    elements: dict
    required: true
"""

EXAMPLES = r"""
- name: Scrub the outgoing copy
  drydock_scrub:
    database: wagtail_site__outgoing
    socket_dir: /var/run/postgresql
    rules:
      - {name: user_emails, table: auth_user, sql: "UPDATE auth_user SET email = 'user' || id || '@example.invalid'"}
"""

RETURN = r"""
ran: {description: "Rules that ran, with the rows each changed.", type: list, returned: success}
without_table: {description: "Rules whose table does not exist, not applied (not C(skipped): Ansible would report the task itself as skipped).", type: list, returned: success}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.module_utils.drydock_pg import (require_psycopg, APP_DATABASE_ARGS, connect, is_table,
                                             refuse_code_of_its_own)


class MissingTable(Exception):
    pass


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(APP_DATABASE_ARGS, rules=dict(type="list", elements="dict", required=True)),
        supports_check_mode=True,
    )
    p = module.params
    for rule in p["rules"]:
        if not {"name", "table", "sql"} <= set(rule):
            module.fail_json(msg=f"a scrub rule needs name, table and sql: {rule!r}")
    require_psycopg(module)
    import psycopg

    ran, without_table = [], []
    try:
        with connect(p["socket_dir"], p["port"], p["database"]) as conn:
            refuse_code_of_its_own(module, conn, "scrub", writes=True)
            # A database never pulled or migrated: the rules' tables are missing for that reason.
            if not is_table(conn, "public.django_migrations"):
                raise MissingTable(f"{p['database']} holds no Django tables (no django_migrations): there is nothing "
                                   "to push; pull a copy into the local database first (inv pull <server>)")
            # The rules are the operator's SQL, written for the app's tables without their schema
            # (auth_user, not public.auth_user): they run with `public` on the search path, in this
            # transaction only. Not "$user", public: as the superuser that is a schema named after
            # it first (postgres), which the app's role (the database's owner) can create, and an
            # auth_user of its own there would take the rules' writes while public.auth_user left
            # unscrubbed. What they run runs as the superuser, which is why the database's own
            # code was refused above: docs/runbook.md, section 8.
            conn.execute("SET LOCAL search_path TO public")
            for rule in p["rules"]:
                if not is_table(conn, rule["table"]):
                    if boolean(rule.get("required", True), strict=False):
                        raise MissingTable(f"scrub rule {rule['name']}: its table {rule['table']} does not exist, so "
                                           "its data would leave unscrubbed: correct the rule in pg_scrub_rules, or "
                                           "give it required: false if this site may lack that table")
                    without_table.append(rule["name"])
                    continue
                rows = conn.execute(rule["sql"]).rowcount
                ran.append({"name": rule["name"], "rows": rows})
            if not ran:
                raise MissingTable(f"no scrub rule ran on {p['database']} ("
                                   + (f"none of the {len(p['rules'])} in pg_scrub_rules has its table"
                                      if p["rules"] else "pg_scrub_rules is empty")
                                   + "): nothing would be scrubbed; correct pg_scrub_rules, or push an unscrubbed dump "
                                     "knowingly (--dump with --allow-unscrubbed)")
            if module.check_mode:
                conn.rollback()
    except MissingTable as error:
        module.fail_json(msg=str(error))
    except psycopg.Error as error:
        module.fail_json(msg=f"scrubbing {p['database']} failed, nothing was changed: {' '.join(str(error).split())}")
    module.exit_json(changed=bool(ran), ran=ran, without_table=without_table)


if __name__ == "__main__":
    main()
