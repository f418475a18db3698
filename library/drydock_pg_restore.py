#!/usr/bin/python
"""Ansible module: restore a checked archive into a new side database and check its rows."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_pg_restore
short_description: Create a side database, pg_restore an archive into it, check its row counts
description:
  - Drops C(database) first where an interrupted run left it (C(drop_existing)), creates it
    (UTF8, from template0), runs C(pg_restore --exit-on-error --no-owner --role=owner
    --jobs=N) into it, checks every table's row count against C(expect_row_counts), then
    deletes C(archive).
  - Until its row counts are checked, the database is the superuser's and no other role may
    connect to it (it is created accepting no connection until PUBLIC's right to connect is
    revoked); C(owner) may create in it and owns its public schema, for pg_restore's
    sessions as that role. Then C(owner) owns it, the public schema is the database owner's,
    and every role may connect, as to a new database.
  - Before anything is created, refuses a dump that brings functions (or aggregates,
    procedures), triggers or rules of its own that C(trusted_functions) does not name: the
    superuser's sessions could run them (an index expression, a partition key, a cast in a
    foreign key's check, a trigger or a rule on a table drydock writes).
  - pg_restore runs twice: the schema (pre-data) first, then the rows and what follows them.
    In between, the module refuses to load rows when a CHECK constraint (of a table or a
    domain) or a generated column calls a function other than PostgreSQL's own immutable ones
    or an installed extension's, unless C(trusted_functions) names it: it would run as each
    row is loaded, in pg_restore's session, which logged in as the superuser (C(--role) only
    sets the app's role, and a function can reset it).
  - With C(live_database), also lists the Django migrations applied in that database (the
    live one, on the same server) that the restored copy lacks: the code running on the
    live database expects them, so the caller can refuse to swap such a copy in.
  - One module for what were four tasks: each task costs a module start (0.2-0.3 s here on a
    quiet machine, over 1 s on a loaded one), and a push and a pull each restore once.
  - On failure the archive and the side database are left for the caller's cleanup (the
    role's discard tasks), and the message is the error that stopped pg_restore (its
    C(stderr) is returned too) or the tables whose counts differ.
  - The archive is removed only if it is still the file the module started with: a module
    left running by a controller that died must not remove the next run's archive.
  - Connects to the C(postgres) maintenance database over the local socket as the current
    OS user (peer authentication); pg_restore does the same.
  - In check mode nothing is created or restored; the module reports the pg_restore command
    it would run.
options:
  database: {description: The side database to create and restore into., type: str, required: true}
  owner: {description: The app role; owns the database and every restored object., type: str, required: true}
  archive: {description: The custom-format archive (seekable) to restore., type: path, required: true}
  drop_existing: {description: Drop C(database) first if it exists (a run interrupted after creating it)., type: bool, default: false}
  jobs: {description: Parallel pg_restore jobs., type: int, default: 2}
  toast_compression:
    description: C(default_toast_compression) for every pg_restore session (C(PGOPTIONS)); empty keeps the server's.
    type: str
    default: ""
  expect_row_counts: {description: Row counts the restored tables must have (the manifest's)., type: dict, required: true}
  pg_bindir: {description: Directory of pg_restore., type: path, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  live_database:
    description: The live database whose applied migrations the copy must have (C(migrations_missing)); empty for none.
    type: str
    default: ""
  trusted_functions:
    description:
      - Functions the dump may bring, and its rows' checks may call although they are not
        PostgreSQL's own immutable ones, as C(regprocedure) prints them with only
        C(pg_catalog) on the search path (C(public.valid_isbn(text)), C(now())); triggers and
        rules it may bring, as C(trigger t on public.t) and C(rule r on public.t).
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Restore into the side database (stop at the first error)
  drydock_pg_restore:
    database: wagtail_site__incoming
    owner: wagtail_site
    archive: /var/backups/drydock/incoming/wagtail_site__incoming.dump
    toast_compression: lz4
    expect_row_counts: "{{ manifest.row_counts }}"
    pg_bindir: /usr/lib/postgresql/15/bin
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
command:
  description: The pg_restore commands, schema then rows (run, or in check mode those it would run), each a list.
  type: list
  returned: always
untrusted:
  description:
    - The dump's own functions not trusted (public.f(integer)), or what would run an untrusted
      function as rows are loaded ("constraint c on public.t calls set_config(text,text,boolean)").
  type: list
  returned: when that refused the restore
row_counts: {description: Rows per restored table., type: dict, returned: success}
database_oid:
  description:
    - The oid of the side database this module created. The swap puts live only that one, and
      the clean-up after a failure drops only that one (another run may have put its own under
      the name since).
  type: int
  returned: once the side database was created, on success and failure
migrations_missing:
  description: Migrations (app.name) applied in C(live_database) but not in the copy, sorted; empty without one.
  type: list
  returned: success
stderr: {description: pg_restore's messages., type: str, returned: when pg_restore failed}
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (require_psycopg, applied_migrations, connect, database_exists,
                                             database_oid, drop_database, dumped_code, first_three, pg_restore_error,
                                             refuse_code_of_its_own, refuse_unless_plain_name, row_code_refusal,
                                             row_count_problem, row_counts, SESSION_SETTINGS, set_allow_connections,
                                             table_of_contents, untrusted_row_code, NotTheRestoredDatabase,
                                             refuse_another_database)

# What PostgreSQL accepts for default_toast_compression; anything else never reaches PGOPTIONS.
TOAST_COMPRESSIONS = ("", "pglz", "lz4")


def create_side_database(params: dict) -> int:
    """Create the side database; its oid, which tells it from one another run creates later
    under that name (the swap and the clean-up act only on this one).

    It is the superuser's, and no other role may connect to it, until hand_over(): were the
    app's role its owner, it could let itself in between the check of the schema and the load
    of the rows, and add code that the load would run as the superuser (pg_restore logs in as
    the superuser and only sets the app's role). It accepts no connection at all until
    close_to_other_roles() has revoked PUBLIC's right to connect: a session that came in
    before would stay."""
    from psycopg import sql
    with connect(params["socket_dir"], params["port"], "postgres", autocommit=True) as conn:
        if params["drop_existing"]:
            drop_database(conn, params["database"])
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' ALLOW_CONNECTIONS false").format(
            sql.Identifier(params["database"])))
        return database_oid(conn, params["database"])


def close_to_other_roles(params: dict, oid: int) -> None:
    """Take PUBLIC's rights on the side database, then let connections in: the superuser's.
    Each step here acts on the database this run created (`oid`) or on none: another run
    restoring onto this server (another controller) may have replaced it under its name."""
    from psycopg import sql
    with connect(params["socket_dir"], params["port"], "postgres", autocommit=True) as conn, conn.transaction():
        refuse_another_database(conn, params["database"], oid)
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(params["database"])))
        set_allow_connections(conn, params["database"], True)


def lend_to_the_restore(params: dict, oid: int, lend: bool) -> None:
    """Let pg_restore, in its sessions as the app's role, do in the side database what it could
    in one the role owned: create there (the dump's schemas, trusted extensions) and own its
    public schema (the dump's COMMENT ON SCHEMA public, its GRANTs and REVOKEs there). With
    `lend` false, take both back: the schema is the database owner's again, as in a new
    database. Nothing when the app's role is the superuser drydock connects as: it owns the
    database already."""
    from psycopg import sql
    name, owner = sql.Identifier(params["database"]), sql.Identifier(params["owner"])
    with connect(params["socket_dir"], params["port"], params["database"], autocommit=True) as conn:
        refuse_another_database(conn, params["database"], oid)
        if conn.execute("SELECT current_user").fetchone()[0] == params["owner"]:
            return
        if lend:
            conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(name, owner))
            conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(owner))
        else:
            conn.execute("ALTER SCHEMA public OWNER TO pg_database_owner")
            conn.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(name, owner))


def hand_over(params: dict, oid: int) -> None:
    """Once the copy is restored and checked: the app's role owns the side database, and
    every role may connect to it again, as to one CREATE DATABASE ... OWNER made: its grants
    are the defaults again (NULL), not a list of the same rights, which the swap's carry of
    the live database's grants would then write in another order."""
    from psycopg import sql
    lend_to_the_restore(params, oid, lend=False)
    with connect(params["socket_dir"], params["port"], "postgres", autocommit=True) as conn, conn.transaction():
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(params["database"]), sql.Identifier(params["owner"])))
        refuse_another_database(conn, params["database"], oid)  # after the ALTER, which locks it
        # Only the owner's rights are left by now (what was lent is taken back): no role's
        # dependency on this database's grants (pg_shdepend) is left to tidy.
        conn.execute("UPDATE pg_database SET datacl = NULL WHERE oid = %s", (oid,))


# Why a restore stops when its side database was replaced under its name.
REPLACED = ("{} is no longer the database this run created (another run restoring onto this server replaced it): "
            "nothing of it was handed to the app's role")


# The two runs of pg_restore: the schema, checked before any row is loaded; then the rows,
# and the indexes, constraints and triggers that follow them.
SCHEMA, ROWS = ["--section=pre-data"], ["--section=data", "--section=post-data"]


def restore_commands(p: dict) -> list[list[str]]:
    """pg_restore into the side database as the app role, stopping at the first error."""
    return [[os.path.join(p["pg_bindir"], "pg_restore"), "--exit-on-error", "--no-owner", f"--role={p['owner']}",
             f"--jobs={p['jobs']}", *sections, f"--host={p['socket_dir']}", f"--port={p['port']}",
             f"--dbname={p['database']}", "--", p["archive"]] for sections in (SCHEMA, ROWS)]


def restore(module: AnsibleModule, argvs: list[list[str]], oid: int) -> None:
    schema, rows = argvs
    run_pg_restore(module, schema, argvs, oid)
    refuse_untrusted_row_code(module, argvs, oid)
    run_pg_restore(module, rows, argvs, oid)


def run_pg_restore(module: AnsibleModule, argv: list[str], argvs: list[list[str]], oid: int) -> None:
    p = module.params
    # Session settings for every pg_restore connection, its parallel jobs included: not those
    # the database's owner chose (SESSION_SETTINGS; pg_restore sets the app's role itself).
    pgoptions = SESSION_SETTINGS + (f" -c default_toast_compression={p['toast_compression']}"
                                    if p["toast_compression"] else "")
    try:  # a pg_restore that cannot start fails with the side database named, for its clean-up
        rc, _, stderr = module.run_command(argv, environ_update={"PGOPTIONS": pgoptions}, handle_exceptions=False)
    except OSError as error:
        module.fail_json(msg=f"cannot run {argv[0]}: {error.strerror}", command=argvs, database_oid=oid)
    if rc != 0:
        module.fail_json(msg=pg_restore_error(stderr, rc), rc=rc, stderr=stderr, command=argvs, database_oid=oid)


def refuse_dumped_code(module: AnsibleModule, argvs: list[list[str]]) -> None:
    """Fail, before anything is created, when the dump brings functions, triggers or rules of
    its own that trusted_functions does not name: restored, the superuser's sessions could run
    them in more ways than drydock can check (an index expression, a partition key, a cast in
    a foreign key's check, an aggregate's initial value while the schema is restored, a
    trigger or a rule on a table the Site switch writes)."""
    p = module.params
    try:
        toc = table_of_contents(p["pg_bindir"], p["archive"])
    except RuntimeError as error:
        module.fail_json(msg=str(error), command=argvs)
    own = [name for name in dumped_code(toc) if name not in p["trusted_functions"]]
    if own:
        module.fail_json(
            msg=f"refusing to restore a dump that brings {len(own)} function(s), trigger(s) or rule(s) of its own "
                f"({first_three(own)}): the superuser's sessions "
                "(pg_restore's, drydock's) could run them, and a Django/Wagtail database has none; read them on the "
                "server the dump came from, and if they are the app's and harmless, name them in "
                "pg_restore_trusted_functions (docs/runbook.md, section 8)",
            untrusted=own, command=argvs)


def refuse_untrusted_row_code(module: AnsibleModule, argvs: list[list[str]], oid: int) -> None:
    """Fail before the rows are loaded when loading them would run a function that is not
    PostgreSQL's own immutable one (set_config() in a CHECK constraint, say)."""
    p = module.params
    with connect(p["socket_dir"], p["port"], p["database"]) as conn, conn.cursor() as cur:
        untrusted = untrusted_row_code(cur, p["trusted_functions"])
    if untrusted:
        module.fail_json(msg=row_code_refusal("refusing to load the dump's rows", untrusted,
                                              "as each row is loaded, in a session that logged in as the superuser",
                                              "pg_restore_trusted_functions"),
                         untrusted=untrusted, command=argvs, database_oid=oid)


def file_identity(path: str) -> tuple[int, int, int, int]:
    """What tells this file from one placed later at the same path (the check writes a new
    file, but an inode number alone can be reused)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(database=dict(type="str", required=True), owner=dict(type="str", required=True),
                           archive=dict(type="path", required=True), drop_existing=dict(type="bool", default=False),
                           jobs=dict(type="int", default=2),
                           toast_compression=dict(type="str", default="", choices=list(TOAST_COMPRESSIONS)),
                           expect_row_counts=dict(type="dict", required=True),
                           pg_bindir=dict(type="path", required=True), socket_dir=dict(type="path", required=True),
                           port=dict(type="int", default=5432), live_database=dict(type="str", default=""),
                           trusted_functions=dict(type="list", elements="str", default=[])),
        supports_check_mode=True,
    )
    p = module.params
    if p["jobs"] < 1:
        module.fail_json(msg=f"jobs must be at least 1, not {p['jobs']}")
    refuse_unless_plain_name(module, p["database"])
    argvs = restore_commands(p)
    if module.check_mode:
        module.exit_json(changed=True, command=argvs)
    require_psycopg(module)
    import psycopg

    try:
        archive = file_identity(p["archive"])
    except OSError as error:
        module.fail_json(msg=f"cannot read the archive {p['archive']}: {error.strerror}", command=argvs)
    refuse_dumped_code(module, argvs)
    oid = None  # once created: every result names the side database by it (the clean-up drops only that one)
    try:
        oid = create_side_database(p)
        close_to_other_roles(p, oid)
        lend_to_the_restore(p, oid, lend=True)
        restore(module, argvs, oid)
        with connect(p["socket_dir"], p["port"], p["database"]) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            with conn.cursor() as cur:
                counts = row_counts(cur)
                copy_migrations = migration_names(cur)
            # pg_database is shared: whether the live database exists is seen from here too.
            live = p["live_database"] if p["live_database"] and database_exists(conn, p["live_database"]) else ""
        missing = migrations_missing(module, live, copy_migrations, oid)
        problem = row_count_problem(p["database"], p["expect_row_counts"], counts)
        if problem:
            module.fail_json(msg=problem, row_counts=counts, command=argvs, database_oid=oid)
        hand_over(p, oid)
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()), command=argvs,
                         **({"database_oid": oid} if oid is not None else {}))
    except NotTheRestoredDatabase:
        module.fail_json(msg=REPLACED.format(p["database"]), command=argvs, database_oid=oid)
    # Restored and checked: the archive (production data) has served its purpose.
    try:
        if file_identity(p["archive"]) == archive:
            os.unlink(p["archive"])
    except FileNotFoundError:
        pass
    except OSError as error:
        module.fail_json(msg=f"restored and checked, but cannot remove the archive {p['archive']}: {error.strerror}",
                         row_counts=counts, command=argvs, database_oid=oid)
    module.exit_json(changed=True, row_counts=counts, migrations_missing=missing, database_oid=oid, command=argvs)


def migration_names(cur) -> set[str]:
    return {f"{app}.{name}" for app, name in applied_migrations(cur)}


def migrations_missing(module: AnsibleModule, live: str, copy_migrations: set[str], oid: int) -> list[str]:
    """The migrations applied in the live database that the copy lacks ([] without one). The
    live database may have taken code of its own since its last backup: it is refused first."""
    if not live:
        return []
    p = module.params
    with connect(p["socket_dir"], p["port"], live) as conn, conn.cursor() as cur:
        refuse_code_of_its_own(module, conn, "read", database_oid=oid)
        return sorted(migration_names(cur) - copy_migrations)


if __name__ == "__main__":
    main()
