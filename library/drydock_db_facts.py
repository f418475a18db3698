#!/usr/bin/python
"""Ansible module: row counts, migration heads and fingerprints of a database."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_db_facts
short_description: Read row counts, Django migration heads and fingerprints of a database
description:
  - Reads every table's exact row count, the latest applied migration per Django app and
    the write counters, in one repeatable-read snapshot; optionally an md5 of all content.
  - With C(expect_row_counts), fails naming every table whose count differs.
  - Connects over the local socket as the current OS user (peer authentication). Read only.
options:
  database: {description: Database to read., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  trusted_functions: {description: "Functions, triggers and rules of the database's own to accept, as a refusal names them; any other refuses the module before it reads a table.", type: list, elements: str, default: []}
  content: {description: Also return an md5 of each table's content (reads every row)., type: bool, default: false}
  row_counts: {description: "Count every table's rows (reads every table); false for the write counters alone.", type: bool, default: true}
  end_other_sessions:
    description:
      - End every other session on the database first, waiting up to 5 s for each to exit.
      - A session can hold its latest write counters back for up to 10 s, and always sends
        them as it exits; use only once the app is stopped.
    type: bool
    default: false
  expect_row_counts: {description: Row counts that must match exactly (e.g. a manifest's)., type: dict}
  compare_writes_with:
    description:
      - A write fingerprint taken earlier; C(writes_since) lists the tables written since.
      - When the database was replaced since (another oid), writes count from the baseline a
        push recorded on it, if that push came from the backup C(lineage_sha256) names;
        otherwise C(writes_unknown) says why they cannot be counted.
    type: dict
  lineage_sha256:
    description: The sha256 of the backup C(compare_writes_with) was taken with.
    type: str
  writes_since_push:
    description:
      - Compare the write counters with the baseline recorded on this database when it was
        swapped in (by a push, or by a rollback's exchange, which records C(drydock_live_since));
        C(writes_unknown) says why when there is none.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Check the restored copy against the manifest
  drydock_db_facts:
    database: wagtail_site__incoming
    socket_dir: /var/run/postgresql
    expect_row_counts: "{{ manifest.row_counts }}"
"""

RETURN = r"""
row_counts: {description: Rows per table., type: dict, returned: when row_counts}
migrations: {description: Latest applied Django migration per app., type: dict, returned: success}
write_fingerprint: {description: Per-table write counters., type: dict, returned: success}
content_fingerprint: {description: md5 per table of its content., type: dict, returned: when content}
writes_since: {description: "Tables written since C(compare_writes_with), e.g. 'blog_post (+3)'.", type: list, returned: when compare_writes_with or writes_since_push}
writes_unknown: {description: "Why the writes since C(compare_writes_with) cannot be counted, e.g. 'its database was replaced' (null when they can).", type: str, returned: when compare_writes_with or writes_since_push}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (require_psycopg, APP_DATABASE_ARGS, connect, content_fingerprint,
                                             count_writes, database_comment, latest_migrations, refuse_code_of_its_own,
                                             row_count_problem, row_counts, terminate_sessions, write_fingerprint)


def _baseline(value) -> dict | None:
    """A recorded baseline ({write_fingerprint, recorded, ...}), or None when the comment
    holds none, or something else under its name."""
    return value if isinstance(value, dict) and isinstance(value.get("write_fingerprint"), dict) else None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(APP_DATABASE_ARGS, content=dict(type="bool", default=False),
                           row_counts=dict(type="bool", default=True), end_other_sessions=dict(type="bool", default=False),
                           expect_row_counts=dict(type="dict"), compare_writes_with=dict(type="dict"),
                           lineage_sha256=dict(type="str"), writes_since_push=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    params = module.params
    require_psycopg(module)
    import psycopg

    try:
        with connect(params["socket_dir"], params["port"], params["database"]) as conn:
            if params["end_other_sessions"] and not module.check_mode:
                terminate_sessions(conn, params["database"], wait_ms=5000)
                conn.commit()  # the snapshot below starts after they have gone
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            refuse_code_of_its_own(module, conn, "read")
            with conn.cursor() as cur:
                facts = dict(migrations=latest_migrations(cur), write_fingerprint=write_fingerprint(cur))
                if params["row_counts"] or params["expect_row_counts"] is not None:
                    facts["row_counts"] = row_counts(cur)
                if params["content"]:
                    facts["content_fingerprint"] = content_fingerprint(cur)
            record = database_comment(conn, params["database"])
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    pushed = _baseline(record.get("drydock_pushed"))
    if pushed:  # the dump it swapped in, for a refusal to name (as verify's origin line does)
        pushed = {**pushed, "copy": record.get("drydock_pushed_copy")}
    if params["compare_writes_with"] is not None:
        facts["writes_since"], facts["writes_unknown"] = count_writes(
            params["compare_writes_with"], facts["write_fingerprint"], pushed, params["lineage_sha256"])
    if params["writes_since_push"]:
        # Since it was swapped in: by a push, or later by an exchange (a rollback, either way).
        swapped_in = _baseline(record.get("drydock_live_since")) or pushed
        facts["writes_since"], facts["writes_unknown"] = (
            count_writes(swapped_in["write_fingerprint"], facts["write_fingerprint"], None, None) if swapped_in
            else ([], "no swap by drydock recorded its write counters on it"))
    expected = params["expect_row_counts"]
    if expected is not None:
        problem = row_count_problem(params["database"], expected, facts["row_counts"])
        if problem:
            module.fail_json(msg=problem, **facts)
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()
