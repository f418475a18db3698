#!/usr/bin/python
"""Ansible module: set a Wagtail Site's hostname and port, in one transaction."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_site
short_description: Set hostname and port of a Wagtail Site (and django_site), atomically
description:
  - Updates C(wagtailcore_site) (the default Site, or the one named C(site_name)) and, for the
    default Site, C(django_site) where that table exists, in a single transaction that is
    rolled back unless exactly one Site matched. Nothing is half-changed on failure.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  database: {description: Database to change., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  trusted_functions: {description: "Functions, triggers and rules of the database's own to accept, as a refusal names them; any other refuses the module before it reads or writes a table.", type: list, elements: str, default: []}
  hostname: {description: "New hostname (a DNS name), stored lower-cased as Wagtail matches it.", type: str, required: true}
  site_port: {description: New port of the Site., type: int, required: true}
  site_name: {description: site_name of the Site to change; empty for the default Site., type: str, default: ""}
  django_site_id: {description: Row of django_site (SITE_ID) to change with the default Site., type: int, default: 1}
  verify_only:
    description:
      - Only read (SELECT, no lock, no write) and return in C(problems) how the Site differs
        from C(hostname) and C(site_port); for verification of live databases.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Point the copy at localhost
  drydock_site:
    database: wagtail_site
    socket_dir: /var/run/postgresql
    hostname: localhost
    site_port: 8000
"""

RETURN = r"""
before: {description: hostname and port before the change., type: dict, returned: success}
django_site: {description: The django_site domain written, or null when not changed., type: str, returned: success}
problems: {description: How the Site differs from the expected one., type: list, returned: verify_only}
drydock_account: {description: "What changed, in a line for drydock's summary: the Site's address before and after, or that it was already so.", type: str, returned: success}
"""

import re

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import APP_DATABASE_ARGS, connect, is_table, refuse_code_of_its_own, require_psycopg

# RFC 1123 host names; \Z, not $, so that a trailing newline is refused too.
HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def django_domain(hostname: str, port: int) -> str:
    """Django's Site.domain carries the port only when it is not the scheme's default."""
    return hostname if port in (80, 443) else f"{hostname}:{port}"


class SiteError(Exception):
    pass


def site_tables(conn) -> tuple[bool, bool]:
    """Whether the database has Wagtail's Site table, and Django's (an app may lack the sites app)."""
    return is_table(conn, "public.wagtailcore_site"), is_table(conn, "public.django_site")


def site_problems(conn, database: str, hostname: str, port: int, site_name: str, django_site_id: int) -> list[str]:
    """How the Site differs from hostname:port, read only. Writes nothing, so that the write
    counters the push guard compares are not disturbed."""
    tables = site_tables(conn)
    if not tables[0]:
        return [f"database {database} has no wagtailcore_site table"]
    where, args = ("is_default_site", ()) if not site_name else ("site_name = %s", (site_name,))
    rows = conn.execute(f"SELECT hostname, port, is_default_site FROM public.wagtailcore_site WHERE {where}",
                        args).fetchall()
    if len(rows) != 1:
        return [f"{len(rows)} Sites match {'the default Site' if not site_name else repr(site_name)}, expected 1"]
    problems = []
    if tuple(rows[0][:2]) != (hostname, port):
        capitals = rows[0][0].lower() == hostname and rows[0][1] == port
        problems.append(f"{rows[0][0]}:{rows[0][1]}, expected {hostname}:{port}"
                        + (" (stored with capitals, Wagtail never matches it: set it again)" if capitals else ""))
    if tables[1] and rows[0][2]:  # django_site follows the default Site, however it was named
        row = conn.execute("SELECT domain FROM public.django_site WHERE id = %s", (django_site_id,)).fetchone()
        if row is None:
            problems.append(f"django_site has no row {django_site_id} (SITE_ID)")
        elif row[0] != django_domain(hostname, port):
            problems.append(f"django_site domain {row[0]}, expected {django_domain(hostname, port)}")
    return problems


def switch(conn, database: str, hostname: str, port: int, site_name: str, django_site_id: int) -> dict:
    tables = site_tables(conn)
    if not tables[0]:
        raise SiteError(f"database {database} has no wagtailcore_site table: is it a Wagtail site's database?")
    where, args = ("is_default_site", ()) if not site_name else ("site_name = %s", (site_name,))
    rows = conn.execute(f"SELECT id, hostname, port, is_default_site FROM public.wagtailcore_site WHERE {where}"
                        " FOR UPDATE", args).fetchall()
    which = "the default Site" if not site_name else f"site_name {site_name!r}"
    if not rows:
        raise SiteError(f"no Site matches {which} in {database}: nothing changed")
    if len(rows) > 1:
        raise SiteError(f"{len(rows)} Sites match {which} in {database}: nothing changed")
    site_id, old_host, old_port, is_default = rows[0]
    # Rows already right are not updated: an update counts as a write, and a push to production
    # refuses a target that has taken writes since its backup.
    conn.execute("UPDATE public.wagtailcore_site SET hostname = %s, port = %s WHERE id = %s"
                 " AND (hostname, port) IS DISTINCT FROM (%s, %s)", (hostname, port, site_id, hostname, port))
    domain, old_domain, domain_changed = None, None, False
    if tables[1] and is_default:  # django_site follows the default Site, however it was named
        domain = django_domain(hostname, port)
        row = conn.execute("SELECT domain FROM public.django_site WHERE id = %s", (django_site_id,)).fetchone()
        old_domain = row[0] if row else None
        domain_changed = row is not None and old_domain != domain  # no row: nothing is written
        conn.execute("UPDATE public.django_site SET domain = %s WHERE id = %s AND domain IS DISTINCT FROM %s",
                     (domain, django_site_id, domain))
    changed = (old_host, old_port) != (hostname, port) or domain_changed
    if (old_host, old_port) != (hostname, port):
        account = f"it was {old_host}:{old_port}"
    elif changed:
        account = f"the Site was already so; django_site's domain was {old_domain}"
    else:
        account = "it was already so: nothing changed"
    return {"before": {"hostname": old_host, "port": old_port}, "django_site": domain, "changed": changed,
            "drydock_account": account}


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(APP_DATABASE_ARGS, hostname=dict(type="str", required=True),
                           site_port=dict(type="int", required=True), site_name=dict(type="str", default=""),
                           django_site_id=dict(type="int", default=1), verify_only=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    p = module.params
    require_psycopg(module)
    if not HOSTNAME.match(p["hostname"]) or not 1 <= p["site_port"] <= 65535:
        module.fail_json(msg=f"invalid Site hostname {p['hostname']!r} or port {p['site_port']}")
    # Wagtail matches a request's host lower-cased (and its own forms lower-case the Site's):
    # a Site stored with capitals would never be found.
    p["hostname"] = p["hostname"].lower()
    import psycopg

    try:
        if p["verify_only"]:
            with connect(p["socket_dir"], p["port"], p["database"], autocommit=True) as conn:
                refuse_code_of_its_own(module, conn, "read")
                module.exit_json(changed=False, problems=site_problems(
                    conn, p["database"], p["hostname"], p["site_port"], p["site_name"], p["django_site_id"]))
        with connect(p["socket_dir"], p["port"], p["database"]) as conn:
            refuse_code_of_its_own(module, conn, "switch the Site of", writes=True)
            result = switch(conn, p["database"], p["hostname"], p["site_port"], p["site_name"], p["django_site_id"])
            if module.check_mode:
                conn.rollback()
            # leaving the `with` block commits; an exception rolls everything back
    except SiteError as error:
        module.fail_json(msg=str(error))
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
