#!/usr/bin/python
"""Ansible module: check Wagtail's materialised-path page tree."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_page_tree
short_description: Check the Wagtail page tree (path, depth, numchild, orphans, duplicates)
description:
  - Wagtail keeps its pages in a treebeard materialised-path tree; moving and deleting pages
    by hand or in a half-run migration can leave it inconsistent. This checks that every
    page's depth agrees with its path, every numchild with its real children, every page
    has a parent, and no path appears twice. Fails naming what is wrong unless C(report_only).
  - Read only. Connects over the local socket as the current OS user (peer authentication).
options:
  database: {description: Database to check., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  trusted_functions: {description: "Functions, triggers and rules of the database's own to accept, as a refusal names them; any other refuses the module before it reads a table.", type: list, elements: str, default: []}
  report_only: {description: Return the problems without failing., type: bool, default: false}
"""

EXAMPLES = r"""
- name: Check the page tree
  drydock_page_tree:
    database: wagtail_site
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
pages: {description: Number of pages., type: int, returned: success}
problems: {description: One line per problem found (at most 20)., type: list, returned: always}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import APP_DATABASE_ARGS, connect, is_table, refuse_code_of_its_own, require_psycopg

STEPLEN = 4  # treebeard's path step length in Wagtail

CHECKS = {
    "depth does not match its path": f"""
        SELECT id, path, depth FROM public.wagtailcore_page WHERE depth <> length(path) / {STEPLEN}
           OR length(path) % {STEPLEN} <> 0""",
    "numchild does not match its children": f"""
        SELECT p.id, p.path, p.numchild, coalesce(c.n, 0) FROM public.wagtailcore_page p
        LEFT JOIN (SELECT left(path, -{STEPLEN}) AS parent, count(*) AS n FROM public.wagtailcore_page
                   WHERE depth > 1 GROUP BY 1) c ON c.parent = p.path
        WHERE p.numchild <> coalesce(c.n, 0)""",
    "has no parent (orphan)": f"""
        SELECT c.id, c.path FROM public.wagtailcore_page c
        WHERE c.depth > 1 AND NOT EXISTS (SELECT 1 FROM public.wagtailcore_page p WHERE p.path = left(c.path, -{STEPLEN}))""",
    "path appears more than once": """
        SELECT min(id), path, count(*) FROM public.wagtailcore_page GROUP BY path HAVING count(*) > 1""",
}


def tree_problems(cur, limit: int = 20) -> list[str]:
    problems = []
    for what, query in CHECKS.items():
        cur.execute(query)
        for row in cur.fetchall():
            problems.append(f"page {row[0]} ({row[1]}): {what}" + (f" {row[2:]}" if len(row) > 2 else ""))
    return problems[:limit] + ([f"… and {len(problems) - limit} more"] if len(problems) > limit else [])


def main() -> None:
    module = AnsibleModule(argument_spec=dict(APP_DATABASE_ARGS, report_only=dict(type="bool", default=False)),
                           supports_check_mode=True)
    p = module.params
    require_psycopg(module)
    import psycopg

    try:
        with connect(p["socket_dir"], p["port"], p["database"]) as conn, conn.cursor() as cur:
            refuse_code_of_its_own(module, conn, "read the page tree of", problems=[])
            if not is_table(cur, "public.wagtailcore_page"):
                module.fail_json(msg=f"database {p['database']} has no wagtailcore_page table", problems=[])
            cur.execute("SELECT count(*) FROM public.wagtailcore_page")
            pages = cur.fetchone()[0]
            problems = tree_problems(cur)
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()), problems=[])
    if problems and not p["report_only"]:
        module.fail_json(msg=f"the page tree of {p['database']} is inconsistent: {'; '.join(problems[:3])}"
                             + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""),
                         pages=pages, problems=problems)
    module.exit_json(changed=False, pages=pages, problems=problems)


if __name__ == "__main__":
    main()
