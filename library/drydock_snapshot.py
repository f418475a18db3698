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
  - Restore swaps the snapshot's ready copy C(db__ready_name) in by renaming, when there is
    one made from the snapshot as it is; otherwise it copies the snapshot into C(db__incoming)
    and swaps that in, with the replaced database's grants, connection limit and settings
    (a template copy takes none). The replaced database is kept as C(db__previous); the generation before
    it is renamed aside, left for C(prepare) to drop. A snapshot of another database is refused.
  - Prepare is the second half of save and restore, which run it in the background (see
    C(background)): it drops the generation a restore put aside and, for a snapshot saved with
    C(ready_copy), makes its ready copy, so that the next restore is a rename. An action that
    comes while it runs waits for it: every action but list and copy takes the same advisory
    lock first.
  - Sessions on the databases involved are terminated first.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  action:
    description:
      - What to do. C(copy) makes a working copy C(db__name) that accepts connections and keeps
        the source's drydock record (lineage), e.g. the outgoing copy a push scrubs and dumps.
    type: str
    required: true
    choices: [save, restore, delete, list, copy, prepare]
  database: {description: The database the snapshots are of., type: str, required: true}
  name: {description: "Snapshot name: lower-case letters, digits and single _ (at most 30); not for list.", type: str}
  force: {description: With save, replace an existing snapshot of that name., type: bool, default: false}
  ready_copy:
    description:
      - With save, keep a ready copy of the snapshot beside it (made by C(prepare)), so that a
        restore is a rename instead of a copy. It doubles the snapshot's disk use.
    type: bool
    default: false
  background:
    description:
      - After a restore, or a save with C(ready_copy), run C(prepare) in a detached process
        (it waits for this action's lock, so it starts as the module returns) instead of
        before returning. The module returns as soon as its own action is done.
    type: bool
    default: true
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

- name: Keep a ready copy of it, made before the module returns
  drydock_snapshot:
    action: save
    database: wagtail_site
    name: before_notebook
    ready_copy: true
    background: false
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
snapshot: {description: Database name of the snapshot., type: str, returned: save, restore, delete}
snapshots: {description: "Every snapshot: name, database, source, size (bytes), created, ready (has a ready copy), ready_copy_error.", type: list, returned: list}
ready_copy_used: {description: Whether the restore swapped the ready copy in (else it copied the snapshot)., type: bool, returned: restore}
database_s: {description: "Seconds of the restore's database work, from taking the lock to the swap (excludes starting Python, psycopg and Ansible).", type: float, returned: restore}
ready_copy_error: {description: Why the last background attempt to make the ready copy failed (null if it did not)., type: str, returned: restore}
prepare: {description: "C(background), or what prepare did when not in the background.", type: raw, returned: "restore, save with ready_copy"}
dropped: {description: The generation a restore had put aside and prepare dropped (null if none)., type: str, returned: prepare}
ready_copy: {description: The ready copy prepare made (null if none was needed)., type: str, returned: prepare}
"""

import os
import re
import signal
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (require_psycopg, allow_connections_again, aside_name, connect,
                                             database_comment, database_exists, database_oid, drop_database,
                                             parse_record, set_allow_connections, set_database_comment,
                                             suffixed_name, swap_in, terminate_sessions, utc_now)

NAME = re.compile(r"(?!.*__)[a-z0-9][a-z0-9_]{0,29}\Z")  # as drydock/validate.py
SEPARATOR = "__snap_"
READY = "__ready_"


class SnapshotError(Exception):
    pass


def snapshot_db(database: str, name: str) -> str:
    return f"{database}{SEPARATOR}{name}"


def ready_db(database: str, name: str) -> str:
    return f"{database}{READY}{name}"


LOCK_WAIT = "30min"  # a ready copy of a large database being made; far more means a stuck one


def lock_snapshots(conn, database: str) -> None:
    """Take (waiting for it) the lock every snapshot action on `database` holds until it
    ends: a restore waits for a ready copy being made instead of copying a second time."""
    psycopg = psycopg_module()
    conn.execute(f"SET lock_timeout = '{LOCK_WAIT}'")
    try:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"drydock-snapshots:{database}",))
    except psycopg.errors.LockNotAvailable:
        raise SnapshotError(f"another snapshot action on {database} has held its lock for {LOCK_WAIT}: see "
                            "pg_stat_activity (application_name drydock) on the local server") from None
    finally:
        conn.execute("RESET lock_timeout")


def list_snapshots(conn) -> list[dict]:
    rows = conn.execute(
        "SELECT datname, oid, pg_database_size(oid), shobj_description(oid, 'pg_database') FROM pg_database"
        " WHERE strpos(datname, %s) > 0 OR strpos(datname, %s) > 0 ORDER BY datname", (SEPARATOR, READY)).fetchall()
    # A ready copy counts only if it was made from the snapshot as it is now (same oid).
    ready_of = {parse_record(comment).get("snapshot_oid") for datname, _oid, _size, comment in rows if READY in datname}
    snapshots = []
    for datname, oid, size, comment in rows:
        if SEPARATOR not in datname or datname.endswith(("__old", "__new")):  # a ready copy, or a save's leftover
            continue
        source, name = datname.split(SEPARATOR, 1)
        meta = parse_record(comment)
        # The comment is the record; the name is the fallback (e.g. the pull's pre_pull snapshot,
        # whose age is when the pull's swap set it aside).
        snapshots.append({"name": meta.get("drydock_snapshot", name), "database": datname,
                          "source": meta.get("source", source),
                          "size": size, "created": meta.get("created") or meta.get("set_aside"),
                          "ready": oid in ready_of,
                          "ready_copy_error": meta.get("ready_copy_error")})
    return snapshots


def file_copy(conn, source: str, target: str) -> None:
    """CREATE DATABASE target as a file copy of source, owned like it, once the sessions on
    source are ended (a template must have none while it is copied)."""
    sql = psycopg_sql()
    owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (source,)).fetchone()[0]
    terminate_sessions(conn, source)
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} STRATEGY FILE_COPY").format(
        sql.Identifier(target), sql.Identifier(source), sql.Identifier(owner)))


def template_copy(conn, source: str, target: str) -> None:
    """file_copy() of a database in use: connections to it are blocked meanwhile, then
    allowed again, whatever interrupts the copy. (Snapshots accept none, and are copied with
    file_copy() alone.)"""
    try:
        set_allow_connections(conn, source, False)
        file_copy(conn, source, target)
    finally:
        with _signals_held():  # a SIGTERM now waits until connections are allowed again
            allow_connections_again(conn, source)


@contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


MAX_NAME_BYTES = 63  # PostgreSQL cuts longer database names short, and two could become one


def cut_short(name: str) -> str | None:
    """Why PostgreSQL would not keep `name` whole, or None when it fits."""
    return f"{name} would pass PostgreSQL's {MAX_NAME_BYTES} bytes" if len(name.encode()) > MAX_NAME_BYTES else None


def new_name(snapshot: str) -> str:
    """Where a save makes the snapshot before it takes the name `snapshot`."""
    return suffixed_name(snapshot, "__new")


def save(conn, database: str, name: str, force: bool, ready_copy: bool = False) -> str:
    target, ready = snapshot_db(database, name), ready_db(database, name)
    longest = ready if ready_copy else target
    if too_long := cut_short(longest):
        raise SnapshotError(f"snapshot name {name} is too long for database {database}: {too_long}"
                            + (" (or save with --no-ready-copy)" if ready_copy else ""))
    if not database_exists(conn, database):
        raise SnapshotError(f"database {database} does not exist")
    if database_exists(conn, target) and not force:
        raise SnapshotError(f"snapshot {name} of {database} exists already: delete it, or replace it with --force")
    # The new snapshot is made whole, recorded and closed under a name of its own, then renamed
    # in, setting an old one aside in the same transaction: a save that fails or is interrupted
    # (disk full, Ctrl-C) leaves the snapshot of that name and its ready copy as they were,
    # and the name never holds one without its record (a restore of it would lose the
    # database's lineage) or open to connections. A leftover <snapshot>__new or __old is
    # dropped by the next save of the name or its delete.
    incoming = new_name(target)
    drop_database(conn, incoming)
    template_copy(conn, database, incoming)
    set_database_comment(conn, incoming, {
        "drydock_snapshot": name, "source": database, "created": utc_now(),
        "lineage": database_comment(conn, database).get("drydock_lineage"), "ready_copy": ready_copy})
    set_allow_connections(conn, incoming, False)  # nobody changes a snapshot
    swap_in(conn, target, incoming, aside_name(target))
    drop_database(conn, aside_name(target))
    # The old snapshot's, or one a deleted snapshot of that name left: made from another
    # database than this one, it would never be used, only take room.
    drop_ready_copy(conn, database, name)
    return target


def drop_ready_copy(conn, database: str, name: str) -> None:
    """Drop snapshot `name`'s ready copy, if it has one. A ready copy's name that PostgreSQL
    would cut short is none (save refuses to make one) and may be another snapshot's: a long
    database name and two names alike but for their last letters, saved without ready copies."""
    if cut_short(ready_db(database, name)) is None:
        drop_database(conn, ready_db(database, name))


def ready_copy_of(conn, database: str, name: str) -> str | None:
    """The ready copy of snapshot `name`, if one was made from the snapshot as it is now."""
    ready = ready_db(database, name)
    oid = database_oid(conn, snapshot_db(database, name))
    return ready if oid is not None and database_comment(conn, ready).get("snapshot_oid") == oid else None


def prepare(conn, database: str, name: str | None) -> dict:
    """The background half of save and restore: drop what a restore put aside, and make the
    snapshot's ready copy if it was saved with one and has none."""
    previous_aside = aside_name(f"{database}__previous")
    dropped = database_exists(conn, previous_aside)
    drop_database(conn, previous_aside)
    made = None
    snapshot = snapshot_db(database, name) if name else None
    if snapshot and database_comment(conn, snapshot).get("ready_copy") and not ready_copy_of(conn, database, name):
        made = ready_db(database, name)
        drop_database(conn, made)  # one made from an earlier snapshot of that name, or half made
        oid = database_oid(conn, snapshot)
        file_copy(conn, snapshot, made)
        if database_oid(conn, snapshot) != oid:  # replaced meanwhile by something that takes no lock (a pull's swap)
            drop_database(conn, made)
            raise SnapshotError(f"{snapshot} was replaced while its ready copy was being made")
        set_allow_connections(conn, made, False)  # untouched until a restore swaps it in
        # The record comes last: a copy without it (interrupted) is not taken for ready.
        set_database_comment(conn, made, {"drydock_ready_copy": snapshot, "snapshot_oid": oid})
        record_ready_copy_error(conn, snapshot, None)
    return {"dropped": previous_aside if dropped else None, "ready_copy": made}


def record_ready_copy_error(conn, snapshot: str, error: str | None) -> None:
    """Keep why a ready copy could not be made in the snapshot's record, for list and restore
    to say (None clears it)."""
    record = database_comment(conn, snapshot)
    if record and record.get("ready_copy_error") != error:
        record["ready_copy_error"] = error
        set_database_comment(conn, snapshot, {key: value for key, value in record.items() if value is not None})


def copy(conn, database: str, name: str) -> str:
    """A working copy <database>__<name>, replacing an older one; keeps the drydock record."""
    target = f"{database}__{name}"
    if too_long := cut_short(target):  # cut short, its drop could hit another database
        raise SnapshotError(f"database {database} has too long a name for a working copy: {too_long}")
    drop_database(conn, target)
    template_copy(conn, database, target)
    set_database_comment(conn, target, database_comment(conn, database) or None)
    return target


def find(conn, database: str, name: str) -> dict:
    snapshots = list_snapshots(conn)
    matches = [s for s in snapshots if s["name"] == name]
    mine = [s for s in matches if s["source"] == database and s["database"] == snapshot_db(database, name)]
    if mine:
        return mine[0]
    if matches:
        raise SnapshotError(f"snapshot {name} was taken of database {matches[0]['source']}, not {database}: refusing to restore it over {database}")
    names = sorted(s["name"] for s in snapshots if s["source"] == database)  # a misspelled name's neighbours
    raise SnapshotError(f"no snapshot {name} of {database} ({'it has ' + ', '.join(names) if names else 'it has none'})")


def restore(conn, database: str, name: str) -> tuple[str, bool]:
    """Swap the snapshot's ready copy in, or a fresh copy of it; returns the snapshot and
    whether the ready copy was used."""
    snapshot = find(conn, database, name)["database"]
    incoming = ready_copy_of(conn, database, name)
    drop_database(conn, f"{database}__incoming")  # an interrupted restore's
    if incoming is None:
        incoming = f"{database}__incoming"
        file_copy(conn, snapshot, incoming)
    # The restored database carries the lineage its source had when the snapshot was taken,
    # and when it went live (inv verify's account of the live database).
    record = database_comment(conn, snapshot)
    lineage = record.get("lineage") or record.get("drydock_lineage")  # a snapshot's, or a renamed database's
    set_database_comment(conn, incoming, {**({"drydock_lineage": lineage} if lineage else {}), "swapped_in": utc_now(),
                                          "swapped_in_by": "snapshot restore", "restored_snapshot": name})
    set_allow_connections(conn, incoming, True)
    # The generation before __previous is dropped by prepare, in the background.
    swap_in(conn, database, incoming, f"{database}__previous", drop_aside=False)
    return snapshot, incoming != f"{database}__incoming"


def delete(conn, database: str, name: str) -> str:
    snapshot = find(conn, database, name)["database"]
    drop_ready_copy(conn, database, name)
    for leftover in (new_name(snapshot), aside_name(snapshot)):  # a save's
        drop_database(conn, leftover)
    drop_database(conn, snapshot)
    return snapshot


def psycopg_sql():
    from psycopg import sql

    return sql


def psycopg_module():
    import psycopg

    return psycopg


def detach(work: Callable[[], None]) -> None:
    """Run `work` in a detached grandchild (a session of its own, no inherited output), so
    that the module returns at once while it goes on; like Ansible's async_wrapper, but
    without an `async` task, whose start alone (temporary files, permissions, no
    pipelining) took as long as a whole restore by rename."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the parent's stays open here
        work()
    finally:
        os._exit(0)  # never back into Ansible's exit path: that is the parent's


def prepare_later(socket_dir: str, port: int, database: str, name: str) -> None:
    """prepare() in the background, under the lock; why it failed, if it did, goes into the
    snapshot's record (nobody reads this process's output)."""
    def work() -> None:
        with connect(socket_dir, port, "postgres", autocommit=True) as conn:
            try:
                lock_snapshots(conn, database)
                prepare(conn, database, name)
            except Exception as error:  # noqa: BLE001 - reported through the record instead
                record_ready_copy_error(conn, snapshot_db(database, name), " ".join(str(error).split())[:300])

    detach(work)


def _interrupt(signum, frame) -> None:
    for stop in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main() -> None:
    # Ansible stops a module it abandons (drydock interrupted) with SIGTERM, which would end
    # Python at once. As an interrupt instead, psycopg cancels the running statement and the
    # `finally` blocks run: a copy interrupted mid-way lets connections into the live local
    # database again (template_copy), rather than leaving it refusing every one.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    module = AnsibleModule(
        argument_spec=dict(action=dict(type="str", required=True,
                                       choices=["save", "restore", "delete", "list", "copy", "prepare"]),
                           database=dict(type="str", required=True), name=dict(type="str"),
                           force=dict(type="bool", default=False), ready_copy=dict(type="bool", default=False),
                           background=dict(type="bool", default=True),
                           socket_dir=dict(type="path", required=True),
                           port=dict(type="int", default=5432)),
        supports_check_mode=True,
        required_if=[("action", "save", ["name"]), ("action", "restore", ["name"]), ("action", "delete", ["name"]),
                     ("action", "copy", ["name"])],
    )
    p = module.params
    if p["name"] is not None and not NAME.match(p["name"]):
        module.fail_json(msg=f"invalid snapshot name {p['name']!r}: use lower-case letters, digits and single _ (at most 30)")
    require_psycopg(module)
    import psycopg

    background = False
    try:
        with connect(p["socket_dir"], p["port"], "postgres", autocommit=True) as conn:
            if p["action"] == "list":
                module.exit_json(changed=False, snapshots=list_snapshots(conn))
            if module.check_mode:
                module.exit_json(changed=True, snapshot=snapshot_db(p["database"], p["name"] or ""))
            started = time.monotonic()  # the database work, lock wait included
            if p["action"] != "copy":  # copy makes the push's working copy, no snapshot
                lock_snapshots(conn, p["database"])
            if p["action"] == "prepare":
                module.exit_json(changed=True, **prepare(conn, p["database"], p["name"]))
            if p["action"] == "restore":
                snapshot, used = restore(conn, p["database"], p["name"])
                result = dict(snapshot=snapshot, ready_copy_used=used, database_s=round(time.monotonic() - started, 3),
                              ready_copy_error=database_comment(conn, snapshot).get("ready_copy_error"))
            else:
                action = {"save": lambda: save(conn, p["database"], p["name"], p["force"], p["ready_copy"]),
                          "delete": lambda: delete(conn, p["database"], p["name"]),
                          "copy": lambda: copy(conn, p["database"], p["name"])}[p["action"]]
                result = dict(snapshot=action())
            follow_up = p["action"] == "restore" or (p["action"] == "save" and p["ready_copy"])
            if follow_up and p["background"]:
                background = True
                result["prepare"] = "background"
            elif follow_up:
                result["prepare"] = prepare(conn, p["database"], p["name"])
        # Forked only now that this connection is closed and its lock released: a child
        # holding the socket would keep a killed module's session, and its lock, alive.
        if background:
            prepare_later(p["socket_dir"], p["port"], p["database"], p["name"])
        module.exit_json(changed=True, **result)
    except SnapshotError as error:
        module.fail_json(msg=str(error))
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))


if __name__ == "__main__":
    main()
