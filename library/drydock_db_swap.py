#!/usr/bin/python
"""Ansible module: put a fully restored side database in place of the live one."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_db_swap
short_description: Swap a side database in for the live one by renaming, keeping the old one
description:
  - In one transaction, terminates the sessions on the databases involved and renames live
    to C(previous) and C(incoming) to live: either both renames happen or neither does, even
    if the module is killed half-way. Takes milliseconds whatever the size.
  - In that transaction C(incoming) takes the live database's grants, connection limit and
    settings (the server's, which a dump does not carry), in place of its own; in an
    exchange, the database brought live takes them likewise: they stay with the live name.
  - An existing database named C(previous) (the generation before) is renamed aside in the
    same transaction and dropped only once the swap has succeeded (with C(keep_older), kept
    until the caller decides).
  - When the live database does not exist (yet, or dropped by hand), C(incoming) is simply
    renamed, and an existing C(previous) stays as it is: nothing is kept aside, nothing dropped.
  - The old live database's comment records when it was set aside (C(set_aside)), which
    C(inv snapshot.list) shows as the age of the pull's C(pre_pull) snapshot.
  - An exchange marks the database it sets aside as set aside by an exchange, and records on
    the database it brings live its write counters at that moment (C(drydock_live_since)),
    from which a later rollback of a protected target counts its writes, unless that
    database was itself set aside by an exchange: it may hold writes (taken before it went
    aside) that were never counted as lost, so it keeps its earlier baseline.
  - Connects to the C(postgres) maintenance database over the local socket as the current
    OS user (peer authentication).
options:
  database: {description: The live database name., type: str, required: true}
  incoming: {description: The side database holding the new content., type: str}
  previous: {description: The name the old live database is kept under., type: str, required: true}
  exchange:
    description:
      - Instead of swapping C(incoming) in, exchange the live database and C(previous)
        (rollback, and the automatic swap back after a failed health check).
    type: bool
    default: false
  comment:
    description:
      - A JSON record (the copy's lineage) written on C(incoming) before the swap, in place of
        the one it has.
      - Either way the database going live (C(incoming), or C(previous) in an exchange) is
        noted as live since now (C(swapped_in), C(swapped_in_by)).
    type: dict
  failed_check:
    description:
      - With C(exchange), the swap-back of a database that failed its check (a push's, or a
        rollback's): why, recorded on the database set aside, so that C(inv verify) names it
        and C(inv rollback) refuses to bring it back.
    type: str
  incoming_oid:
    description:
      - The oid of the C(incoming) database the caller restored and checked (the restore's
        C(database_oid)). Nothing is swapped unless C(incoming) is still that database: another
        run restoring onto the same server (from another controller, whose locks are its own)
        drops and creates a database of that name, and its half-restored copy must never go live.
    type: int
  keep_older:
    description:
      - With a swap, keep the generation before C(previous) (the database it replaces there)
        as C(previous)__old rather than drop it, and return its oid as C(older_oid): a push
        that fails its checks after the swap puts it back (C(older_oid) with C(exchange)),
        one that passes drops it (C(drop_older)). Without it, a push that was swapped back
        would have cost the database C(inv rollback) brought back before it.
    type: bool
    default: false
  older_oid:
    description:
      - With C(exchange) (a push's swap-back), also put the database of this oid, kept as
        C(previous)__old by the swap, back as C(previous); the database that failed takes the
        name C(previous)__old (the next swap drops it). Nothing of that unless
        C(previous)__old is still that database: then a plain exchange.
      - With C(drop_older), the database to drop.
    type: int
  live_oid:
    description:
      - With C(exchange) (a push's swap-back), the oid of the copy the swap put live: nothing is
        exchanged unless C(database) is still that one (another run from another controller may
        have swapped since).
    type: int
  drop_older:
    description:
      - Only drop C(previous)__old if it is the database C(older_oid) (the push it was kept
        for went live and passed its checks). A failure to is a warning: the next swap drops
        it.
    type: bool
    default: false
  close_previous:
    description:
      - After a swap, stop the database kept as C(previous) accepting connections, as every
        snapshot does (the pull keeps the replaced local database as its C(pre_pull) snapshot).
    type: bool
    default: false
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
"""

EXAMPLES = r"""
- name: Swap the restored copy in
  drydock_db_swap:
    database: wagtail_site
    incoming: wagtail_site__incoming
    previous: wagtail_site__previous
    socket_dir: /var/run/postgresql
"""

RETURN = r"""
previous: {description: Name of the old live database, or null when there was none., type: str, returned: success}
terminated: {description: Sessions terminated on the live database., type: int, returned: success}
drydock_account:
  description:
    - An exchange's, where the database now live came from, in a line (see drydock_db_origin).
    - A swap's, what it set aside, or, without a live database, that it set nothing aside (C(nothing was live to set
      aside: ...)), which drydock's lines then say.
  type: str
  returned: success
older_oid:
  description: The oid of the generation kept as C(previous)__old, or null when there was none.
  type: int
  returned: a swap with keep_older
older_restored:
  description: Whether the swap-back put the kept generation back as C(previous) (the copy that failed is then C(previous)__old).
  type: bool
  returned: an exchange
dropped: {description: "The database drop_older dropped, or null.", type: str, returned: drop_older}
"""

from datetime import datetime, timezone

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_pg import (require_psycopg, add_to_record, aside_name, connect, database_comment,
                                             database_exists, database_oid, drop_database, exchange,
                                             exchange_restoring_older, origin_of, refuse_another_database,
                                             set_allow_connections, set_database_comment, swap_in, utc_now,
                                             write_fingerprint, NotTheRestoredDatabase)


def note(conn, name: str, fields: dict) -> None:
    """Add to a database's record when it went live or aside, and by what (a swap of a
    restored copy, or an exchange): for inv snapshot.list's ages and inv verify's account of
    which database is live. Failing to must not fail the swap."""
    try:
        add_to_record(conn, name, fields)
    except Exception:  # noqa: BLE001
        pass


def account(conn, name: str) -> str | None:
    """Where the database now live came from, for the rollback's line. Read after the exchange
    has committed: failing to must not fail it (the rollback would say nothing was exchanged)."""
    try:
        return origin_of(database_comment(conn, name))
    except Exception:  # noqa: BLE001
        return None


def record_live_since(conn, socket_dir: str, port: int, name: str) -> None:
    """Note on `name`, about to go live, its write counters now, if a push set it aside: the
    push's guard made sure the copy that replaced it held all it had. One an exchange set
    aside keeps its earlier baseline, so that writes it took before (a rollback let them go
    aside) count again when it is rolled back again. Without a note a rollback refuses for
    want of a baseline (never a wrong count), as it does for a database whose comment is not
    drydock's (left as it is): failing to write it must not stop the exchange."""
    try:
        record = database_comment(conn, name)
        if record.get("set_aside_by") in ("exchange", "swap-back"):
            return
        with connect(socket_dir, port, name) as db:
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            with db.cursor() as cur:
                counters = write_fingerprint(cur)
        now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        add_to_record(conn, name, {"drydock_live_since": {"write_fingerprint": counters, "recorded": now}})
    except Exception:  # noqa: BLE001 - the rollback then refuses without --allow-lost-writes
        pass


def close_snapshot(module: AnsibleModule, conn, name: str) -> None:
    """Stop the kept database accepting connections, as every snapshot. The swap has happened:
    this must not fail it (a pull would then say the local database is unchanged)."""
    try:
        set_allow_connections(conn, name, False)
    except Exception as error:  # noqa: BLE001 - a snapshot that accepts connections is only less guarded
        module.warn(f"{name} still accepts connections: {' '.join(str(error).split())}")


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(database=dict(type="str", required=True), incoming=dict(type="str"),
                           previous=dict(type="str", required=True), socket_dir=dict(type="path", required=True),
                           port=dict(type="int", default=5432), exchange=dict(type="bool", default=False),
                           comment=dict(type="dict"), close_previous=dict(type="bool", default=False),
                           failed_check=dict(type="str"), incoming_oid=dict(type="int"),
                           keep_older=dict(type="bool", default=False), older_oid=dict(type="int"),
                           live_oid=dict(type="int"),
                           drop_older=dict(type="bool", default=False)),
        supports_check_mode=True,
        mutually_exclusive=[("exchange", "drop_older")],
        required_if=[("drop_older", True, ["older_oid"])],
    )
    p = module.params
    if p["drop_older"]:
        drop_older(module)
    if not p["exchange"] and not p["incoming"]:
        module.fail_json(msg="a swap needs incoming (the side database to swap in)")
    names = [p["database"], p["previous"]] + ([] if p["exchange"] else [p["incoming"]])
    if len(set(names)) != len(names):
        module.fail_json(msg="database, incoming and previous must be different names")
    require_psycopg(module)
    import psycopg

    try:
        with connect(p["socket_dir"], p["port"], "postgres", autocommit=True) as conn:
            if p["exchange"]:
                missing = [n for n in (p["database"], p["previous"]) if not database_exists(conn, n)]
                if missing:
                    module.fail_json(msg=f"cannot exchange: database {missing[0]} does not exist")
                if module.check_mode:
                    module.exit_json(changed=True, previous=p["previous"], terminated=0)
                older = aside_name(p["previous"])
                older_restored = p["older_oid"] is not None and database_oid(conn, older) == p["older_oid"]
                # Brought back with the older generation behind it, the database keeps the write
                # baseline it had: a rollback to that generation must count every write it took
                # since it went live, which the copy that failed held but the generation lacks.
                if not older_restored:
                    record_live_since(conn, p["socket_dir"], p["port"], p["previous"])
                try:
                    if older_restored:
                        try:
                            terminated = exchange_restoring_older(conn, p["database"], p["previous"], p["older_oid"],
                                                                  p["live_oid"])
                        except NotTheRestoredDatabase:  # replaced meanwhile: the plain exchange below checks live
                            older_restored = False
                    if not older_restored:
                        terminated = exchange(conn, p["database"], p["previous"], p["live_oid"])
                except NotTheRestoredDatabase:
                    module.fail_json(msg=f"refusing to swap back: {p['database']} is no longer the copy this run swapped"
                                         " in (another run has swapped since); nothing was exchanged")
                # Under their new names: the previous database is live now, and the other aside (as
                # previous, or as previous__old when the generation before is previous again).
                at = utc_now()
                by = "swap-back" if p["failed_check"] else "exchange"
                note(conn, p["database"], {"swapped_in": at, "swapped_in_by": by})
                # The database set aside: previous, or the kept generation's name when that is previous again.
                note(conn, aside_name(p["previous"]) if older_restored else p["previous"],
                     {"set_aside": at, "set_aside_by": by,
                      **({"failed_check": p["failed_check"]} if p["failed_check"] else {})})
                module.exit_json(changed=True, previous=p["previous"], terminated=terminated,
                                 older_restored=older_restored, drydock_account=account(conn, p["database"]))
            if not database_exists(conn, p["incoming"]):
                module.fail_json(msg=f"nothing to swap in: database {p['incoming']} does not exist")
            refuse_another_database(conn, p["incoming"], p["incoming_oid"])  # before its comment is written
            has_live = database_exists(conn, p["database"])
            if module.check_mode:
                module.exit_json(changed=True, previous=p["previous"] if has_live else None, terminated=0)
            at = utc_now()  # one time for both sides of the swap
            swapped_in = {"swapped_in": at, "swapped_in_by": "swap"}
            if p["comment"] is not None:  # the copy's own record, which later guards rely on: written or failed
                set_database_comment(conn, p["incoming"], {**p["comment"], **swapped_in})
            else:
                note(conn, p["incoming"], swapped_in)
            # Read before the swap (a rename keeps a database's oid), so that nothing can fail once it has committed.
            # Without a live database, previous is not moved aside (swap_in): no generation is kept.
            older_oid = database_oid(conn, p["previous"]) if p["keep_older"] and has_live else None
            terminated = swap_in(conn, p["database"], p["incoming"], p["previous"], drop_aside=not p["keep_older"],
                                 incoming_oid=p["incoming_oid"])
            if has_live:
                note(conn, p["previous"], {"set_aside": at, "set_aside_by": "swap"})
                if p["close_previous"]:
                    close_snapshot(module, conn, p["previous"])
    except NotTheRestoredDatabase:
        module.fail_json(msg=f"refusing to swap in {p['incoming']}: it is no longer the database this run restored and "
                             "checked (another run restoring onto this server replaced it)")
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()))
    set_aside = (f"{p['database']} was set aside as {p['previous']}" if has_live else
                 f"nothing was live to set aside: {p['previous']} was left as it was")
    module.exit_json(changed=True, previous=p["previous"] if has_live else None, terminated=terminated,
                     drydock_account=set_aside, **({"older_oid": older_oid} if p["keep_older"] else {}))


def drop_older(module: AnsibleModule) -> None:
    """Drop the generation a push's swap kept (keep_older), now that the push passed its
    checks, if it is still the database older_oid. Never fails: the push has succeeded, and a
    leftover is dropped by the next swap."""
    p = module.params
    older = aside_name(p["previous"])
    require_psycopg(module)
    dropped = None
    try:
        with connect(p["socket_dir"], p["port"], "postgres", autocommit=True) as conn:
            if database_oid(conn, older) == p["older_oid"]:
                if not module.check_mode:
                    drop_database(conn, older)
                dropped = older
    except Exception as error:  # noqa: BLE001 - said, not failed
        module.warn(f"{older}, the generation before {p['previous']}, could not be dropped "
                    f"({' '.join(str(error).split())}): the next push drops it")
    module.exit_json(changed=dropped is not None, dropped=dropped)


if __name__ == "__main__":
    main()
