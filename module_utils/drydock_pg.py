"""Shared helpers for drydock's modules: connect over the local socket as the database's
OS user (peer authentication, no password anywhere), and read the facts a manifest and a
verification need. Small pure functions; each takes an open psycopg cursor."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
from datetime import datetime, timezone

try:
    import psycopg
    from psycopg import sql
    HAS_PSYCOPG = True
except ImportError:  # reported by the modules with a clear message
    HAS_PSYCOPG = False

def require_psycopg(module) -> None:
    """Fail the Ansible module with a clear message when the host's Python lacks psycopg."""
    if not HAS_PSYCOPG:
        module.fail_json(msg="psycopg (3) is not importable by this host's Python (Debian: apt install python3-psycopg)")


# A database name as drydock's roles accept it (their preflights check the same). pg_dump and
# pg_restore read a --dbname holding '=' or starting with postgresql:// as a connection string
# (host=elsewhere ...), so the modules that hand a name to them check it themselves too.
PLAIN_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


def refuse_unless_plain_name(module, name: str) -> None:
    if not PLAIN_DATABASE_NAME.match(name):
        module.fail_json(msg=f"not a plain database name: {name!r} (lower-case letters, digits and _, at most 63)")


PG_CONNECTION_ARGS = dict(
    database=dict(type="str", required=True),
    socket_dir=dict(type="path", required=True),
    port=dict(type="int", default=5432),
)


# The modules connect as the cluster's superuser, into databases the app's role owns, and
# that role may create functions and operators in their `public` schema. With `public` on
# the search path, a function there whose argument types fit a call better than the built-in
# one is chosen instead (CVE-2018-1058: a `public.shobj_description(oid, text)` would run as
# the superuser at every backup). So only pg_catalog is searched, and the app's tables are
# named with their schema (`public.django_migrations`).
#
# The database's owner may also set any session's settings (ALTER DATABASE ... SET), and
# settings given at connection override them (SESSION_SETTINGS, also pg_dump's and
# pg_restore's, in PGOPTIONS): no `role` (drydock's sessions would run as the app's role,
# which a row security policy could then show no rows: a scrub that scrubs nothing); no
# library to load (local_preload_libraries: one that is not there fails every connection);
# no time limit (a common statement_timeout would stop a long count, and
# idle_in_transaction_session_timeout the session holding a dump's snapshot); not read-only.
SESSION_SETTINGS = ("-c role=none -c local_preload_libraries= -c statement_timeout=0 -c lock_timeout=0"
                    " -c idle_in_transaction_session_timeout=0 -c idle_session_timeout=0"
                    " -c default_transaction_read_only=off")
SAFE_SESSION = f"-c search_path=pg_catalog,pg_temp {SESSION_SETTINGS}"


def connect(socket_dir: str, port: int, database: str, autocommit: bool = False):
    return psycopg.connect(host=socket_dir, port=port, dbname=database, autocommit=autocommit,
                           application_name="drydock", options=SAFE_SESSION)


def is_table(conn, name: str) -> bool:
    """Whether `name` is a table, ordinary or partitioned (`conn`: a connection or a cursor);
    schema-qualified, unless the caller chose the search path. A view (or a foreign table) of
    that name is taken for none: what a view runs, the superuser reading it would run."""
    return conn.execute("SELECT EXISTS (SELECT FROM pg_class WHERE oid = to_regclass(%s) AND relkind IN ('r', 'p'))",
                        (name,)).fetchone()[0]


# The schemas of the app's tables: all but information_schema and the system's, whose names
# begin with pg_ (PostgreSQL refuses that prefix to any other; in LIKE, _ would match any
# character, and the app's role may create a schema pgxtemp).
USER_SCHEMA = "n.nspname <> 'information_schema' AND left(n.nspname, 3) <> 'pg_'"


def user_tables(cur) -> list[tuple[str, str]]:
    """(schema, table) of every ordinary or partitioned table outside the system schemas."""
    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        f" WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMA} ORDER BY 1, 2")
    return [(schema, table) for schema, table in cur.fetchall()]


def extensions_own(catalog: str, row: str, owner: str) -> str:
    """SQL: whether the object `row` (an oid in `catalog`, owned by `owner`) is an extension's
    own: a member of one, owned by a superuser. An extension's script makes its objects as one,
    even a trusted extension's that the app's role creates; what the role adds to an
    extension later (ALTER EXTENSION ... ADD) stays the role's."""
    return (f"(EXISTS (SELECT FROM pg_depend WHERE classid = '{catalog}'::regclass AND objid = {row} AND deptype = 'e')"
            f" AND (SELECT rolsuper FROM pg_roles WHERE oid = {owner}))")


def ordinary_tables(cur) -> dict[int, str]:
    """The ordinary tables outside the system schemas (a partitioned one's rows are its
    partitions'), by oid, each named as row_counts() names it; but an extension's own, which
    a superuser owns (its CREATE EXTENSION makes them again; a table the app's role adds to an
    extension is the role's)."""
    cur.execute(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        f" WHERE c.relkind = 'r' AND {USER_SCHEMA} AND NOT {extensions_own('pg_class', 'c.oid', 'c.relowner')}"
        " ORDER BY 2, 3")
    return {oid: table_key(schema, table) for oid, schema, table in cur.fetchall()}


def table_key(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


def row_counts(cur) -> dict[str, int]:
    """Exact row count of every table (in the caller's snapshot)."""
    counts = {}
    for schema, table in user_tables(cur):
        cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
        counts[table_key(schema, table)] = cur.fetchone()[0]
    return counts


def latest_migrations(cur) -> dict[str, str]:
    """The latest applied Django migration per app, or {} where there is no django_migrations."""
    if not is_table(cur, "public.django_migrations"):
        return {}
    cur.execute("SELECT DISTINCT ON (app) app, name FROM public.django_migrations ORDER BY app, applied DESC, id DESC")
    return dict(cur.fetchall())


def write_fingerprint(cur) -> dict:
    """Per-table write counters (inserts + updates + deletes since the statistics were reset),
    each table's file (`relfilenode`), and which database they count: a database that
    replaced this one by a restore and a rename has counters of its own, which cannot be
    compared with these.

    The counters do not see a TRUNCATE, which gives the table a new file instead; so do
    VACUUM FULL, CLUSTER and table rewrites, which are then taken as writes too (refusing
    rather than losing one). Not transactional, but monotonic: if a later reading of the
    same database differs, the table took writes.
    """
    cur.execute("SELECT d.oid::bigint, s.stats_reset::text FROM pg_database d"
                " JOIN pg_stat_database s ON s.datid = d.oid WHERE d.datname = current_database()")
    database_oid, stats_reset = cur.fetchone()
    # A materialized view's file changes with every REFRESH: its content is derived from the
    # tables, whose own writes are counted, so its file is left out.
    cur.execute("SELECT s.schemaname, s.relname, s.n_tup_ins + s.n_tup_upd + s.n_tup_del,"
                " CASE WHEN c.relkind <> 'm' THEN c.relfilenode::bigint END"
                " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid ORDER BY 1, 2")
    rows = [(table_key(schema, table), int(n), file) for schema, table, n, file in cur.fetchall()]
    return {"database_oid": database_oid, "stats_reset": stats_reset, "tables": {table: n for table, n, _file in rows},
            "files": {table: int(file) for table, _n, file in rows if file is not None}}


def count_writes(before: dict, now: dict, pushed: dict | None, lineage_sha256: str | None) -> tuple[list[str], str | None]:
    """The tables a target wrote to since the backup whose fingerprint is `before`, e.g.
    ["blog_post (+3)"], or, when they cannot be counted, why: ([], reason).

    When a push has replaced the target's database since (another database oid), writes
    count from the baseline that push recorded on it (`pushed`, with the pushed copy's
    record as its `copy`), provided that push came from the same backup; otherwise they are
    unknown. A fingerprint without an oid (an older manifest) is taken as the same database.
    Counters that went back, or statistics reset in between, cannot be compared either: a
    reason, never negative writes.
    """
    baseline = before
    if before.get("database_oid") not in (None, now.get("database_oid")):
        pushed = pushed or {}
        baseline = pushed.get("write_fingerprint") or {}
        if baseline.get("database_oid") != now.get("database_oid"):
            return [], "its database was replaced"
        if lineage_sha256 is None or pushed.get("lineage_sha256") != lineage_sha256:
            copy = pushed.get("copy") if isinstance(pushed.get("copy"), dict) else {}
            which = (f"a push from {copy.get('source', '?')}'s {dump_kind(copy)} {copy['created']}" if copy.get("created")
                     else "a push")
            return [], f"its database was replaced by {which} at {pushed.get('recorded', '?')}, from another backup"
    if baseline.get("stats_reset") != now.get("stats_reset"):
        return [], f"its write statistics were reset ({now.get('stats_reset')})"
    changed = []
    files_then, files_now = baseline.get("files", {}), now.get("files", {})  # none in older manifests
    for table, count in sorted(now.get("tables", {}).items()):
        earlier = baseline.get("tables", {}).get(table)
        if earlier is None:
            changed.append(f"{table} (new table)")
            continue
        if count < earlier:
            return [], "its write counters went back (its database was replaced, or its statistics reset)"
        what = [f"+{count - earlier}"] if count > earlier else []
        if table in files_then and table in files_now and files_then[table] != files_now[table]:
            what.append("truncated or rewritten")
        if what:
            changed.append(f"{table} ({', '.join(what)})")
    return changed, None


def content_fingerprint(cur) -> dict[str, str]:
    """md5 of every table's full content, in a stable order: equal means the same data."""
    result = {}
    for schema, table in user_tables(cur):
        cur.execute(sql.SQL("SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {}.{} AS t")
                    .format(sql.Identifier(schema), sql.Identifier(table)))
        result[table_key(schema, table)] = cur.fetchone()[0]
    return result


def server_version(cur) -> str:
    cur.execute("SHOW server_version")
    return cur.fetchone()[0]


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process may still write on `path`'s disk."""
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# What zstd 1.5 says of data it cannot decompress (a flipped byte, a cut file, not zstd at all).
ZSTD_DAMAGE_SIGNS = ("Decoding error", "premature end", "unsupported format", "Read error", "orrupt")


class DoesNotUnpack(RuntimeError):
    """zstd could not decompress the dump: its data, not the disk, nor pg_restore."""


def zstd_reason(stderr: str) -> str:
    """zstd's message without the file it names (a temporary name): "zstd: <file> : " or
    "zstd: " before it, or "<file> : " alone, as zstd -q writes a read error."""
    text = " ".join(stderr.split())
    if text.startswith("zstd: "):
        return re.sub(r"^zstd: (?:\S*?(?: : |: ))?", "", text)
    return re.sub(r"^/\S*? : ", "", text)


def list_entries(pg_bindir: str, path: str, zstd: bool = False) -> int:
    """Number of TOC entries pg_restore reads (table_of_contents)."""
    return count_entries(table_of_contents(pg_bindir, path, zstd))


def count_entries(toc: str) -> int:
    """Number of entries in a table of contents (its comment lines aside)."""
    return sum(1 for line in toc.splitlines() if line and not line.startswith(";"))


# A table's rows, as a table of contents lists them, with the table's oid: "3348; 0 16385
# TABLE DATA public blog_post wagtail_site" (by the oid: names and owners may hold spaces).
DUMPED_ROWS = re.compile(r"^\d+; 0 (\d+) TABLE DATA ")


def tables_without_rows(toc: str, tables: dict[int, str]) -> list[str]:
    """The tables (ordinary_tables()) whose rows the table of contents does not list. pg_dump
    leaves out a table an extension claims (unless the extension marks it for dumping), and
    the database's owner can add its tables to an extension it created."""
    dumped = {int(match[1]) for line in toc.splitlines() if (match := DUMPED_ROWS.match(line))}
    return [name for oid, name in tables.items() if oid not in dumped]


def table_of_contents(pg_bindir: str, path: str, zstd: bool = False) -> str:
    """The archive's table of contents, as pg_restore --list prints it; raises RuntimeError
    with pg_restore's own last line if it cannot read the archive (corrupt, or made by a
    newer pg_dump), or DoesNotUnpack when zstd could not decompress the part pg_restore read.
    A zstd-compressed archive is read through `zstd -dc`: the table of contents is
    at its start, so pg_restore stops reading after a few kilobytes."""
    command = [os.path.join(pg_bindir, "pg_restore"), "--list"]
    if not zstd:
        proc = subprocess.run(command + [path], capture_output=True, text=True, check=False)
    else:
        with subprocess.Popen(["zstd", "-dcq", "--", path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as unpack:
            proc = subprocess.run(command, stdin=unpack.stdout, capture_output=True, text=True, check=False)
            unpack.stdout.close()  # zstd stops on the closed pipe once pg_restore has the TOC
            unpack_errors = unpack.stderr.read().decode(errors="replace")  # empty, unless the data is damaged
        # Killed by the closed pipe (a negative status) is how zstd ends when pg_restore has read enough.
        if proc.returncode != 0 and unpack.returncode > 0:
            reason = zstd_reason(unpack_errors)
            if any(sign in reason for sign in ZSTD_DAMAGE_SIGNS):
                raise DoesNotUnpack(f"zstd: {reason}")
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise RuntimeError(f"pg_restore --list cannot read {path}: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def count_differences(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """Human-readable differences between two row-count maps, one item per table."""
    problems = []
    for table in sorted(set(expected) | set(actual)):
        if table not in actual:
            problems.append(f"{table}: missing")
        elif table not in expected:
            problems.append(f"{table}: not in the manifest")
        elif expected[table] != actual[table]:
            problems.append(f"{table}: {actual[table]} rows, expected {expected[table]}")
    return problems


def row_count_problem(database: str, expected: dict, actual: dict[str, int]) -> str | None:
    """One line naming the tables (the first five) whose counts differ from `expected`
    (a manifest's, whose values may arrive as strings), or None when all match."""
    problems = count_differences({table: int(count) for table, count in expected.items()}, actual)
    if not problems:
        return None
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return f"row counts of {database} differ from the manifest: {shown}"


def pg_restore_error(stderr: str, rc: int) -> str:
    """The error that stopped pg_restore, in one line. With --exit-on-error its last line is
    often the SQL that failed ("Command was: ..."), and with --jobs the main process reports
    "a worker process died unexpectedly" after the worker's own error: the first error line
    says what went wrong."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("pg_restore: error:")]
    causes = [line for line in errors if "worker process died" not in line]
    return (causes or errors or lines[-1:] or [f"pg_restore exited with {rc}"])[0]


# Code a dump brings of its own, as its table of contents (pg_restore --list) lists it: the
# catalog it goes to (pg_proc 1255 for functions, aggregates and procedures; pg_trigger 2620;
# pg_rewrite 2618 for rules), its kind, schema, name (a function's with its arguments; a
# trigger's or a rule's after its table's) and owner:
# "262; 1255 16491 FUNCTION public planted_ok(integer) wagtail_site",
# "3346; 2618 16395 RULE public blog_post keep_copy wagtail_site". Told by the catalog, not
# the words: a name may hold spaces. An installed extension's functions are not listed (its
# CREATE EXTENSION is).
DUMPED_CODE = re.compile(r"^\d+; (1255|2618|2620) \d+ \S+ (\S+) (.+) \S+$")
CODE_KINDS = {"2618": "rule", "2620": "trigger"}


def dumped_code(toc: str) -> list[str]:
    """The functions (aggregates, procedures), triggers and rules a dump brings of its own,
    named as code_of_its_own() names them once restored (public.planted_ok(integer),
    trigger t on public.blog_post, rule keep_copy on public.blog_post; a name that needs
    quotes may be spelled otherwise)."""
    found = set()
    for line in toc.splitlines():
        if match := DUMPED_CODE.match(line):
            catalog, schema, rest = match.groups()
            if catalog == "1255":
                found.add(f"{schema}.{rest.replace(', ', ',')}")
            else:
                table, _, name = rest.partition(" ")
                found.add(f"{CODE_KINDS[catalog]} {name} on {schema}.{table}")
    return sorted(found)


# Whether the function `p` (a pg_proc row) is one the server's superuser installed: an
# extension's own (extensions_own), or a range type's constructor, which PostgreSQL makes with
# the type (an internal dependency).
INSTALLED_FUNCTION = ("(EXISTS (SELECT FROM pg_depend WHERE classid = 'pg_proc'::regclass AND objid = p.oid"
                      f" AND deptype = 'i') OR {extensions_own('pg_proc', 'p.oid', 'p.proowner')})")


def functions_of_its_own(conn) -> list[str]:
    """The functions (aggregates, procedures) made in this database after initdb that the
    server's superuser did not install, as regprocedure prints them. Read from the catalog
    alone: a superuser's query on the app's tables could run them (an index expression
    calling one with constant arguments is evaluated as PostgreSQL plans the query)."""
    return [name for (name,) in conn.execute(
        f"SELECT oid::regprocedure::text FROM pg_proc p WHERE oid >= 16384 AND NOT {INSTALLED_FUNCTION} ORDER BY 1"
    ).fetchall()]


# The triggers (but those PostgreSQL makes for foreign keys) and rules (but a view's own) on
# this database's tables. A trigger's WHEN condition may call any of PostgreSQL's functions,
# and a rule rewrites an UPDATE or DELETE into statements of its own: run by the superuser's
# write (the Site switch, the scrub), they read a server file for the app's role
# (pg_read_file()), or write one (lo_export()). Django and Wagtail make none.
TRIGGERS_AND_RULES = """
SELECT format('trigger %s on %s', quote_ident(tgname), tgrelid::regclass) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT format('rule %s on %s', quote_ident(rulename), ev_class::regclass) FROM pg_rewrite
 WHERE oid >= 16384 AND ev_type <> '1'
ORDER BY 1
"""


def code_of_its_own(conn, trusted: list[str]) -> list[str]:
    """The functions, triggers and rules of this database's own that `trusted` does not name."""
    names = functions_of_its_own(conn) + [name for (name,) in conn.execute(TRIGGERS_AND_RULES).fetchall()]
    return [name for name in names if name not in trusted]


def first_three(names: list[str]) -> str:
    """The first three of `names`, for a one-line message ("a, b, c, …" when there are more)."""
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def code_refusal(doing: str, database: str, own: list[str]) -> str:
    """Why drydock will not `doing` (back up, read, write) `database`, which holds `own`."""
    return (f"refusing to {doing} {database}: it holds {len(own)} function(s), trigger(s) or rule(s) of its own "
            f"({first_three(own)}), which the superuser's work in it could run, "
            "and a Django/Wagtail database has none; read them, and if they are the app's and harmless, name them "
            "in drydock_trusted_functions (docs/runbook.md, section 8)")


# What runs while pg_restore loads a table's rows (COPY): its CHECK constraints, those of the
# domains its columns have, and its generated columns. Triggers and rules come after the rows
# (post-data), and COPY fires no rule; index builds run as the table's owner, restricted.
ROW_EXPRESSIONS = """
SELECT format('constraint %s on %s', quote_ident(conname),
              CASE WHEN conrelid <> 0 THEN conrelid::regclass::text ELSE 'domain ' || contypid::regtype END),
       conbin::text
  FROM pg_constraint WHERE contype = 'c'
UNION ALL
SELECT format('generated column %s of %s', quote_ident(a.attname), d.adrelid::regclass), d.adbin::text
  FROM pg_attrdef d JOIN pg_attribute a ON (a.attrelid, a.attnum) = (d.adrelid, d.adnum) WHERE a.attgenerated <> ''
"""
# And what a statement that reads a view runs, as whoever reads it: the scrub rules are SQL
# that may read other tables (a subquery on django_content_type), and a view may stand there.
VIEW_QUERIES = """
UNION ALL
SELECT format('view %s', ev_class::regclass), ev_action::text FROM pg_rewrite WHERE oid >= 16384 AND ev_type = '1'
"""
# The functions a stored expression or query (pg_node_tree) calls: a function call's funcid,
# an operator's opfuncid (OpExpr, DistinctExpr, NullIfExpr, ScalarArrayOpExpr), an
# aggregate's or a window function's, and the operators of a row comparison (RowCompareExpr's
# opnos). pg_depend would not do: it records nothing about PostgreSQL's own (pinned)
# functions, set_config() among them.
CALLED_FUNCTIONS = re.compile(r":(?:funcid|opfuncid|aggfnoid|winfnoid) (\d+)")
COMPARED_ROWS = re.compile(r":opnos \(o ([\d ]+)\)")
# A function that may run there: immutable, and PostgreSQL's own or one the superuser installed.
CALLABLE = f"""
SELECT oid::regprocedure::text,
       provolatile = 'i' AND (pronamespace = 'pg_catalog'::regnamespace OR {INSTALLED_FUNCTION})
  FROM pg_proc p WHERE oid = ANY(%s) OR oid IN (SELECT oprcode FROM pg_operator WHERE oid = ANY(%s))
"""


def untrusted_row_code(cur, trusted: list[str], views: bool = False) -> list[str]:
    """What would run a function of the dump's own, or a volatile one, as each row is loaded:
    pg_restore logs in as the superuser and only sets the app's role, which such a function can
    reset (docs/runbook.md, section 8). Each as "constraint c on public.t calls public.f(integer)";
    [] when every expression calls only PostgreSQL's own immutable functions (Django's checks
    do), or functions `trusted` names (as regprocedure prints them: public.f(integer), now()).
    With `views`, the views' queries too."""
    found = []
    for what, tree in cur.execute(ROW_EXPRESSIONS + (VIEW_QUERIES if views else "")).fetchall():
        functions = sorted({int(oid) for oid in CALLED_FUNCTIONS.findall(tree)})
        operators = sorted({int(oid) for group in COMPARED_ROWS.findall(tree) for oid in group.split()})
        if not functions and not operators:
            continue
        for name, callable_ in cur.execute(CALLABLE, (functions, operators)).fetchall():
            if not callable_ and name not in trusted:
                found.append(f"{what} calls {name}")
    return sorted(found)


# The arguments of the modules that read or write the app's tables as the superuser: each
# refuses a database holding code of its own that trusted_functions does not name before it
# touches a table (refuse_code_of_its_own).
APP_DATABASE_ARGS = dict(PG_CONNECTION_ARGS, trusted_functions=dict(type="list", elements="str", default=[]))


def refuse_code_of_its_own(module, conn, doing: str, writes: bool = False, **result) -> None:
    """Fail, before the app's tables are read, when the database `conn` is in holds
    functions, triggers or rules of its own that trusted_functions does not name
    (code_refusal). With `writes`, also when a CHECK constraint, a generated column or a view
    would call a function that is not PostgreSQL's own immutable one as the superuser writes
    a row, or reads the view in a scrub rule's subquery (set_config(), pg_read_file())."""
    trusted, database = module.params["trusted_functions"], conn.info.dbname
    own = code_of_its_own(conn, trusted)
    if own:
        module.fail_json(msg=code_refusal(doing, database, own), untrusted=own, **result)
    if writes:
        with conn.cursor() as cur:
            untrusted = untrusted_row_code(cur, trusted, views=True)
        if untrusted:
            module.fail_json(msg=row_code_refusal(f"refusing to {doing} {database}", untrusted,
                                                  "as the superuser writes a row, or reads a view",
                                                  "drydock_trusted_functions"),
                             untrusted=untrusted, **result)


def row_code_refusal(refusing: str, untrusted: list[str], when: str, variable: str) -> str:
    """Why drydock refuses (`refusing`) what would run `untrusted` (untrusted_row_code) `when`."""
    return (f"{refusing}: {'; '.join(untrusted[:3])}"
            + (f" (and {len(untrusted) - 3} more)" if len(untrusted) > 3 else "")
            + f": a function that is not PostgreSQL's own immutable one would run {when}; if you have read it and "
              f"trust it, name it in {variable} (docs/runbook.md, section 8)")


def database_exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def terminate_sessions(conn, name: str, wait_ms: int = 0) -> int:
    """End every other session on database `name`; the number ended. With `wait_ms`, wait
    up to that long for each to exit (PostgreSQL 14+), e.g. so that it sends its statistics."""
    terminate = "pg_terminate_backend(pid, %s)" if wait_ms else "pg_terminate_backend(pid)"
    args = (wait_ms, name) if wait_ms else (name,)
    return conn.execute(f"SELECT count({terminate}) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()", args).fetchone()[0]


def set_allow_connections(conn, name: str, allow: bool) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
        sql.Identifier(name), sql.SQL("true" if allow else "false")))


def allow_connections_again(conn, name: str) -> None:
    """Let connections into `name` again after `conn` barred them, in a session of its own if
    `conn` cannot: an interrupt (SIGTERM as KeyboardInterrupt) that lands while psycopg reads
    a statement's result can leave the session with that result unread, refusing every
    statement after it ("another command is already in progress"; 6 of 1,295 interrupts of a
    busy session on a loaded machine)."""
    try:
        set_allow_connections(conn, name, True)
    except psycopg.Error:
        # As `conn` connected (its password, if any, is not given back). The parameters that
        # equal libpq's defaults are left out of get_parameters(): those that say where to
        # connect are set again, or PGPORT and the like would choose.
        where = dict(host=conn.info.host, port=conn.info.port, user=conn.info.user, dbname=conn.info.dbname)
        with psycopg.connect(**{**conn.info.get_parameters(), **where}, autocommit=True) as fresh:
            set_allow_connections(fresh, name, True)


class NotTheRestoredDatabase(Exception):
    """The side database about to be swapped in is not the one this run restored and checked."""


def database_oid(conn, name: str) -> int | None:
    row = conn.execute("SELECT oid::bigint FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row[0] if row else None


def refuse_another_database(conn, name: str, expect_oid: int | None) -> None:
    """Raise NotTheRestoredDatabase unless `name` is the database `expect_oid` (None: any).
    Another run restoring onto the same server (another controller: drydock's locks are each
    controller's own) drops and creates the same side database: its half-restored copy must
    never go live in the place of the one this run checked."""
    if expect_oid is not None and database_oid(conn, name) != expect_oid:
        raise NotTheRestoredDatabase(name)


def renames_in_one_transaction(conn, close: list[str], renames: list[tuple[str, str]], attempts: int = 3,
                               expect: list[tuple[str, int | None]] = (), first=None) -> int:
    """End the other sessions on the databases `close`, then call `first()` (if given), then
    apply `renames`, all in one transaction: interrupted or failed at any point (even by
    SIGKILL), nothing has changed.
    PostgreSQL makes a rename wait up to 5 s for a session that connected in between, and
    refuses it if the session stays; then the whole transaction is tried again. With
    `expect` (names after the renames, each with an oid, or None for any), the transaction is
    undone (NotTheRestoredDatabase) unless each name is then that database: checked after the
    renames, which lock them, so that nothing can replace one in between. Returns the number
    of sessions ended."""
    for attempt in range(attempts):
        try:
            with conn.transaction():
                terminated = sum(terminate_sessions(conn, name) for name in close)
                if first is not None:
                    first()
                for old, new in renames:
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))
                for name, oid in expect:
                    refuse_another_database(conn, name, oid)
            return terminated
        except psycopg.errors.ObjectInUse:
            if attempt == attempts - 1:
                raise
    return 0


def suffixed_name(name: str, suffix: str) -> str:
    """`name` ending in `suffix`, cut short so that the whole keeps within PostgreSQL's 63 bytes
    of a database name (drydock's names are ASCII)."""
    return name[:63 - len(suffix)] + suffix


def aside_name(previous: str) -> str:
    """Where a swap puts the generation before `previous` until it is dropped."""
    return suffixed_name(previous, "__old")


def swap_in(conn, database: str, incoming: str, previous: str, drop_aside: bool = True,
            incoming_oid: int | None = None) -> int:
    """Put `incoming` in place of `database`, keeping the old one as `previous`.

    All renames happen in one transaction (see renames_in_one_transaction): either the
    swap happened or nothing did. An existing `previous` (the generation before) is renamed
    aside in that transaction and dropped only once the swap has succeeded (or, with
    `drop_aside=False`, left for the caller to drop later: freeing a large database's files
    can take seconds on some disks). Without a live `database` there is nothing to keep, and
    `previous` stays as it is: moved aside, it would be dropped with no database taking its
    place (a pull onto a local database dropped by hand would lose snapshot pre_pull). With
    `incoming_oid`, raises NotTheRestoredDatabase, and
    nothing is renamed, unless `incoming` is that database (checked in the renames'
    transaction; drydock_db_swap checks first too, before it writes anything). `conn` is an
    autocommit connection to another database (e.g. postgres). Returns the number of
    sessions terminated.
    """
    aside = aside_name(previous)
    drop_database(conn, aside)  # a crash's, or one a push kept and was interrupted before it decided
    renames, carry = [(incoming, database)], None
    if database_exists(conn, database):
        renames.insert(0, (database, previous))
        if database_exists(conn, previous):
            renames.insert(0, (previous, aside))
        carry = functools.partial(carry_database_settings, conn, database, incoming)
    terminated = renames_in_one_transaction(conn, [old for old, _new in renames], renames,
                                            expect=[(database, incoming_oid)], first=carry)
    if not drop_aside:
        return terminated
    # The swap has happened: tidying up the older generation must not fail it.
    try:
        drop_database(conn, aside)
    except Exception:  # noqa: BLE001 - a leftover aside database is dropped by the next swap
        pass
    return terminated


# What aclexplode() calls a database's privileges, and how GRANT names them (the same words).
DATABASE_PRIVILEGES = {"CONNECT": "CONNECT", "CREATE": "CREATE", "TEMPORARY": "TEMPORARY"}


def carry_database_settings(conn, source: str, target: str) -> None:
    """Give `target` the grants, connection limit and settings (ALTER DATABASE ... SET, ALTER
    ROLE ... IN DATABASE ... SET) of `source`, in place of its own. They are the server's, set
    on its live database, not the content's: a database restored from a dump or copied from
    a snapshot has none of them, and swapped in without them it would let back in every role
    that a REVOKE CONNECT ... FROM PUBLIC kept out. Called inside a swap's transaction, before
    its renames. Who granted what is not kept: each grant is recorded as the owner's."""
    found = [conn.execute("SELECT oid, datdba, datconnlimit FROM pg_database WHERE datname = %s", (name,)).fetchone()
             for name in (source, target)]
    if None in found:  # gone since the caller looked: the renames that follow say so
        return
    (source_oid, source_owner, source_limit), (target_oid, target_owner, target_limit) = found
    target_name = sql.Identifier(target)
    # An ACL of NULL means the defaults: aclexplode() of acldefault() spells them out. The
    # owner's rights go to the owner, whoever that is on each side (a live database made by
    # hand with createdb is the superuser's; a restored one, the app role's).
    acl = ("SELECT grantee, privilege_type, is_grantable FROM pg_database,"
           " aclexplode(coalesce(datacl, acldefault('d', datdba))) WHERE oid = %s")
    wanted = sorted((target_owner if grantee == source_owner else grantee, privilege, grantable)
                    for grantee, privilege, grantable in conn.execute(acl, (source_oid,)).fetchall())
    held = sorted(conn.execute(acl, (target_oid,)).fetchall())
    if wanted != held:
        for grantee in sorted({grantee for grantee, _privilege, _grantable in held}):
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(target_name, role_name(conn, grantee)))
        for grantee, privilege, grantable in wanted:
            conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(DATABASE_PRIVILEGES[privilege]), target_name, role_name(conn, grantee),
                sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    # -2 marks a database a DROP DATABASE left half-dropped (PostgreSQL 15.4+): no limit to carry.
    if source_limit >= -1 and source_limit != target_limit:
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(target_name, sql.Literal(source_limit)))
    # Each setting as the server stores it, untouched: written again through ALTER DATABASE ...
    # SET, a value would need quoting by its parameter's kind (search_path is a list). A
    # superuser may write this catalog; DROP DATABASE and DROP ROLE remove their rows.
    settings = "SELECT setrole, setconfig FROM pg_db_role_setting WHERE setdatabase = %s ORDER BY setrole"
    if conn.execute(settings, (source_oid,)).fetchall() != conn.execute(settings, (target_oid,)).fetchall():
        conn.execute("DELETE FROM pg_db_role_setting WHERE setdatabase = %s", (target_oid,))
        conn.execute("INSERT INTO pg_db_role_setting (setdatabase, setrole, setconfig)"
                     " SELECT %s, setrole, setconfig FROM pg_db_role_setting WHERE setdatabase = %s",
                     (target_oid, source_oid))


def role_name(conn, oid: int):
    """A role as GRANT and REVOKE name it: PUBLIC for aclexplode()'s grantee 0."""
    if oid == 0:
        return sql.SQL("PUBLIC")
    return sql.Identifier(conn.execute("SELECT rolname FROM pg_roles WHERE oid = %s", (oid,)).fetchone()[0])


def drop_database(conn, name: str) -> None:
    """Drop `name` if it exists, ending its sessions. `conn`: autocommit, to another database."""
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def exchange(conn, first: str, second: str, first_oid: int | None = None) -> int:
    """Swap the names of two databases (e.g. live and previous) in one transaction,
    after terminating their sessions; `second` takes `first`'s grants, connection limit and
    settings (carry_database_settings: they stay with the live name). With `first_oid`,
    raises NotTheRestoredDatabase, and nothing is renamed, unless `first` was that database.
    Returns the sessions terminated."""
    temporary = first[:55] + "__swapping"
    return renames_in_one_transaction(conn, [first, second],
                                      [(first, temporary), (second, first), (temporary, second)],
                                      expect=[(second, first_oid)],
                                      first=functools.partial(carry_database_settings, conn, first, second))


def exchange_restoring_older(conn, database: str, previous: str, older_oid: int, live_oid: int | None = None) -> int:
    """A push's swap-back: exchange `database` and `previous` as exchange() does and, in the
    same transaction, put the generation a swap kept as aside_name(previous) back as
    `previous`, where inv rollback finds it; the copy that failed takes the kept generation's
    name (writes it took while live are there; the next swap drops it). `previous` takes
    `database`'s grants, connection limit and settings, as in exchange(). Raises
    NotTheRestoredDatabase, and nothing is renamed, unless the kept generation is the
    database `older_oid` (and, with `live_oid`, `database` was that one). Returns the
    sessions terminated."""
    older, temporary = aside_name(previous), database[:55] + "__swapping"
    renames = [(database, temporary), (previous, database), (older, previous), (temporary, older)]
    return renames_in_one_transaction(conn, [database, previous, older], renames,
                                      expect=[(previous, older_oid), (older, live_oid)],
                                      first=functools.partial(carry_database_settings, conn, database, previous))


def parse_record(comment: str | None) -> dict:
    """drydock's JSON record from a database's comment, or {} (none, or not drydock's)."""
    import json

    try:
        value = json.loads(comment) if comment else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def utc_now() -> str:
    """The time as drydock's records on databases hold it (ISO, to the second, UTC): the same
    format everywhere, so that two of them compare as strings."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def database_row(conn, name: str) -> tuple[int, str | None] | None:
    """A database's oid and comment, or None when there is no such database."""
    row = conn.execute("SELECT oid, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                       (name,)).fetchone()
    return (int(row[0]), row[1]) if row else None


def database_comment(conn, name: str) -> dict:
    """drydock's JSON record on a database (its lineage), or {}."""
    row = database_row(conn, name)
    return parse_record(row[1] if row else None)


def set_database_comment(conn, name: str, value: dict | None) -> None:
    import json

    text = sql.Literal(json.dumps(value)) if value else sql.SQL("NULL")
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), text))


def add_to_record(conn, name: str, fields: dict) -> None:
    """Add `fields` to drydock's record on a database, keeping what it holds. A comment that
    is not drydock's record (someone's own words) is left as it is."""
    row = database_row(conn, name)
    if row is None or (row[1] and not parse_record(row[1])):
        return
    set_database_comment(conn, name, {**parse_record(row[1]), **fields})


# What set a database aside or brought it live, in describe_origin's words ("swap": a pull
# or a push swapping a restored copy in; a snapshot restore also names the snapshot).
SWAPPED_BY = {"exchange": "a rollback", "swap-back": "a swap-back", "snapshot restore": "a snapshot restore"}


def dump_kind(pushed: dict) -> str:
    """What a pushed copy's record says it was: "safety backup" (its stamp names a folder under
    backups/<env>/safety/) or "dump" (under backups/<env>/; records made before the kind was)."""
    return "safety backup" if pushed.get("kind") == "safety backup" else "dump"


def origin_of(record: dict) -> str:
    """Where a database's content came from, as drydock's swaps recorded it on the database
    (see parse_record), in a few words for a person."""
    def backup(lineage: dict) -> str:
        return f"{lineage.get('env', '?')}'s backup {lineage.get('created', '?')}"

    pushed, lineage = record.get("drydock_pushed_copy"), record.get("drydock_lineage")
    if isinstance(pushed, dict):
        origin = f"pushed from {pushed.get('source', '?')}'s {dump_kind(pushed)} {pushed.get('created', '?')}"
        if isinstance(pushed.get("lineage"), dict):
            origin += f" (a copy of {backup(pushed['lineage'])})"
        return origin
    if isinstance(lineage, dict):
        return f"restored from {backup(lineage)}"
    return "origin unknown (not restored by drydock)"


def describe_origin(record: dict, live: bool) -> str:
    """origin_of, and when the database went live or aside. `live`: whether it is the live
    database (else a kept generation); times that contradict that (a database renamed by
    hand) are left out."""
    def text(key: str) -> str | None:
        value = record.get(key)
        return value if isinstance(value, str) else None

    origin = origin_of(record)
    went_live, set_aside = text("swapped_in"), text("set_aside")
    if live:
        if went_live and not (set_aside and set_aside > went_live):
            by = SWAPPED_BY.get(record.get("swapped_in_by"))
            if by and isinstance(record.get("restored_snapshot"), str):
                by += f" of {record['restored_snapshot']}"
            return f"{origin}; live since {went_live}" + (f", by {by}" if by else "")
        return origin
    if set_aside and not (went_live and went_live > set_aside):
        by = SWAPPED_BY.get(record.get("set_aside_by"))
        failed = record.get("failed_check")
        why = f": it failed its check ({failed})" if isinstance(failed, str) and by == "a swap-back" else ""
        if went_live:
            return f"{origin}; live from {went_live} until {by or 'it was replaced'} at {set_aside}{why}"
        return f"{origin}; set aside at {set_aside}" + (f", by {by}" if by else "") + why
    return origin


SCHEMA_QUERIES = {
    "table": """
        SELECT c.relname, CASE c.relkind WHEN 'p' THEN 'partitioned table' ELSE 'table' END
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')""",
    "column": """
        SELECT c.relname || '.' || a.attname,
               format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE ' null' END
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               || CASE a.attidentity WHEN 'd' THEN ' identity' WHEN 'a' THEN ' identity always' ELSE '' END
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped""",
    "index": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'""",
    "constraint": """
        SELECT c.relname || '.' || k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'""",
    "sequence": """
        SELECT c.relname, 'sequence' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'S'""",
}


def schema_snapshot(cur) -> dict[str, dict[str, str]]:
    """The public schema as {kind: {object name: definition}}: tables, columns (type,
    nullability, default, identity), indexes, unique/foreign-key/check constraints, sequences."""
    snapshot = {}
    for kind, query in SCHEMA_QUERIES.items():
        cur.execute(query)
        snapshot[kind] = {name: definition for name, definition in cur.fetchall()}
    return snapshot


_CAST = re.compile(r"::(?:character varying|timestamp with(?:out)? time zone|double precision|\"?[a-z_][a-z0-9_]*\"?)"
                   r"(?:\(\d+(?:,\d+)?\))?(?:\[\])?")


def _drop_redundant_parentheses(text: str) -> str:
    """Remove parentheses around a single token, and doubled parentheses "((x))"; keep
    every pair that groups more than one thing, so "(a OR b) AND c" stays distinct."""
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"\(\s*('[^']*'|[\w.\"]+)\s*\)", r"\1", text)
        stack, pairs = [], {}
        for index, char in enumerate(text):
            if char == "(":
                stack.append(index)
            elif char == ")" and stack:
                pairs[stack.pop()] = index
        doubled = [(o, c) for o, c in pairs.items() if text[o + 1:o + 2] == "(" and pairs.get(o + 1) == c - 1]
        if doubled:
            open_, close = doubled[0]
            text = text[:open_] + text[open_ + 1:close] + text[close + 1:]
    return text


def normalized(definition: str) -> str:
    """A definition as PostgreSQL means it, not as it prints it. After a dump and restore the
    same expression deparses differently (a partial index's `(ARRAY['a'::varchar])::text[]`
    comes back as `ARRAY[('a'::varchar)::text]`): casts go (column types are compared on
    their own) and so do parentheses that group nothing. A serial column's
    `default nextval('t_id_seq'::regclass)` and an identity column both mean "generated"."""
    text = re.sub(r"default nextval\('[^']+'(::regclass)?\)", "generated", definition)
    text = re.sub(r"identity( always)?$", "generated", text)
    text = _drop_redundant_parentheses(_CAST.sub("", text))
    return re.sub(r"\s+", " ", text).strip()


def schema_diff(expected: dict, actual: dict) -> list[str]:
    """One line per object that differs from the reference schema, naming it."""
    lines = []
    for kind in SCHEMA_QUERIES:
        want, have = expected.get(kind, {}), actual.get(kind, {})
        for name in sorted(set(want) | set(have)):
            if name not in have:
                # A table's or a sequence's definition is its kind: nothing more to say.
                lines.append(f"{kind} {name}: missing" + ("" if want[name] == kind else f" (expected {want[name]})"))
            elif name not in want:
                lines.append(f"{kind} {name}: not in the code's schema ({have[name]})")
            elif normalized(want[name]) != normalized(have[name]):
                lines.append(f"{kind} {name}: is {have[name]}, expected {want[name]}")
    return lines


def applied_migrations(cur) -> list[list[str]]:
    """Every (app, name) row of django_migrations, or [] where there is no such table."""
    if not is_table(cur, "public.django_migrations"):
        return []
    cur.execute("SELECT app, name FROM public.django_migrations ORDER BY app, name")
    return [[app, name] for app, name in cur.fetchall()]


def migration_diff(code: list, applied: list) -> list[str]:
    """Migrations applied but unknown to the code, and known to the code but not applied."""
    code_set, applied_set = {tuple(m) for m in code}, {tuple(m) for m in applied}
    lines = [f"migration {app}.{name}: recorded in django_migrations but not in the code"
             for app, name in sorted(applied_set - code_set)]
    lines += [f"migration {app}.{name}: in the code but not applied"
              for app, name in sorted(code_set - applied_set)]
    return lines
