#!/usr/bin/python
"""Ansible module: a consistent, verified pg_dump with the facts for its manifest."""
from __future__ import annotations

DOCUMENTATION = r"""
module: drydock_pg_dump
short_description: Dump a PostgreSQL database and describe the dump
description:
  - Opens a repeatable-read transaction, exports its snapshot and runs C(pg_dump --snapshot)
    on it, so the row counts, migration heads and fingerprint reported are exactly those
    of the dump, even while the database takes writes.
  - Writes to C(dest).partial and renames when complete: a file at C(dest) is always whole.
  - With C(compression=zstd), pg_dump writes an uncompressed archive that C(zstd) compresses
    on another core (at 1 GB: 6.6 s and 364 MB, against 9.3 s and 488 MB for pg_dump's own
    zlib at level 1); C(raw_size) is what it unpacks to. C(gzip) is pg_dump's own compression,
    the runbook's C(pg_restore)-ready file.
  - Verifies the result with sha256 and C(pg_restore --list). The file is mode 0600.
  - Connects over the local socket as the current OS user (peer authentication).
options:
  database: {description: Database to dump., type: str, required: true}
  socket_dir: {description: Directory of the server's Unix socket., type: path, required: true}
  port: {description: Server port., type: int, default: 5432}
  dest: {description: Path of the dump file to write., type: path, required: true}
  pg_bindir: {description: Directory of pg_dump and pg_restore., type: path, required: true}
  compression:
    description: "C(zstd) (needs the zstd program; C(dest) should end in C(.dump.zst)) or C(gzip) (pg_dump -Z)."
    type: str
    choices: [zstd, gzip]
    default: zstd
  compress: {description: "Compression level: zstd C(-1)..C(-19), or pg_dump's C(-Z) 0-9.", type: int, default: 1}
  min_free_mb:
    description:
      - Refuse to start when the dump's folder would keep less than this many MB (10^6 bytes)
        free once the dump is written, so that a backup never fills the disk of a database
        server; 0 turns the check off. The dump is expected to be as big as the database's
        newest dump beside it, or, for its first, as the database itself (a dump holds no
        indexes and is compressed).
      - To make room, the database's C(.partial) files are deleted first, then, if need be,
        the dumps that C(keep) would delete after this one.
    type: int
    default: 0
  trusted_functions:
    description:
      - Functions, triggers and rules of the database's own that may be there (a function as
        C(regprocedure) prints it, C(public.valid_isbn(text)); C(trigger t on public.t),
        C(rule r on public.t)). Any other refuses the dump before a table is read: the
        superuser's reads of the app's tables could run it.
    type: list
    elements: str
    default: []
  scrubbed:
    description:
      - The scrub rules this run applied to the database it dumps (the push passes what its
        scrub step ran): the manifest records them, and a push to a protected target refuses
        a scrubbed copy, one to an unprotected target an unscrubbed one. Never read from the
        database's comment, which its owner (the app's role) may write.
    type: list
    elements: str
    default: []
  room_only:
    description:
      - Only check that C(dest)'s folder has room for the dump, as C(min_free_mb) asks, once
        C(reserve_bytes) more are taken: deletes nothing and dumps nothing. Counts the files
        the dump would delete to make room as free. A push runs it before its restore, whose
        safety backup of the target comes after it.
    type: bool
    default: false
  reserve_bytes:
    description: "With C(room_only): bytes another step takes first on the disk of the server's data directory (the restored copy), counted when C(dest)'s folder is on that disk."
    type: int
    default: 0
  keep:
    description:
      - After a successful dump, keep this many of the database's dumps in C(dest)'s folder
        (those named C(<database>-<timestamp>.dump[.zst])) and delete older ones. 0 keeps all.
      - The C(.partial) files of interrupted dumps of the database are deleted in any case.
    type: int
    default: 0
"""

EXAMPLES = r"""
- name: Dump the app database
  drydock_pg_dump:
    database: wagtail_site
    socket_dir: /var/run/postgresql
    port: 5432
    dest: /var/backups/drydock/wagtail_site-20261121T120000Z.dump.zst
    pg_bindir: /usr/lib/postgresql/15/bin
"""

RETURN = r"""
dump: {description: Path of the dump., type: str, returned: always}
command: {description: The pg_dump command (run, or that would run in check mode)., type: list, returned: always}
sha256: {description: Checksum of the dump., type: str, returned: changed}
size: {description: Size in bytes., type: int, returned: changed}
raw_size: {description: "Size of the archive unpacked (zstd), or the size (gzip).", type: int, returned: changed}
toc_entries: {description: Entries that pg_restore --list read., type: int, returned: changed}
row_counts: {description: Rows per table in the dumped snapshot., type: dict, returned: changed}
migrations: {description: Latest applied Django migration per app., type: dict, returned: changed}
write_fingerprint: {description: Per-table write counters, read just before the dump's snapshot., type: dict, returned: changed}
server_version: {description: PostgreSQL server version., type: str, returned: changed}
database_size: {description: Size of the database in bytes (for the target's disk check)., type: int, returned: changed}
scrubbed: {description: Scrub rules applied to this copy., type: list, returned: changed}
lineage: {description: "Where this database's content came from (the backup a pull restored), if recorded.", type: dict, returned: changed}
pg_dump_version: {description: pg_dump version., type: str, returned: changed}
removed: {description: Older dumps deleted to keep C(keep)., type: list, returned: changed}
free_bytes: {description: "With C(room_only): free bytes in the folder, the files it may delete counted.", type: int, returned: room_only}
expected_bytes: {description: "With C(room_only): the size the dump is expected to have.", type: int, returned: room_only}
"""

import os
import re
import shutil
import subprocess
import threading

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.formatters import bytes_to_human
from ansible.module_utils.drydock_pg import (require_psycopg, APP_DATABASE_ARGS, DoesNotUnpack, connect, count_entries,
                                             database_comment, first_three, free_bytes, latest_migrations, refuse_code_of_its_own,
                                             ordinary_tables, refuse_unless_plain_name, row_counts, server_version,
                                             SESSION_SETTINGS, sha256_file, table_of_contents, tables_without_rows,
                                             write_fingerprint)


def dump_command(params: dict, snapshot: str | None, target: str) -> list[str]:
    """pg_dump's command: with zstd, an uncompressed archive on stdout (see Compressor)."""
    zstd = params["compression"] == "zstd"
    command = [os.path.join(params["pg_bindir"], "pg_dump"), "--format=custom",
               f"--compress={0 if zstd else params['compress']}",
               f"--host={params['socket_dir']}", f"--port={params['port']}"]
    if not zstd:
        command.append(f"--file={target}")
    if snapshot:
        command.append(f"--snapshot={snapshot}")
    return command + [f"--dbname={params['database']}"]


class Compressor(threading.Thread):
    """Feeds pg_dump's archive to `zstd` in chunks, counting its bytes: the host that restores
    it must unpack it first (pg_restore -j needs a seekable file) and needs that much room.
    Runs beside the manifest's queries, which share pg_dump's snapshot."""

    CHUNK = 1 << 20

    def __init__(self, dump: subprocess.Popen, level: int, target: str):
        super().__init__(daemon=True)
        self.dump = dump
        self.zstd = subprocess.Popen(["zstd", f"-{level}", "-q", "-o", target], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.raw_size = 0

    def run(self) -> None:
        buffer = bytearray(self.CHUNK)
        view = memoryview(buffer)
        source, sink = self.dump.stdout, self.zstd.stdin
        try:
            while count := source.readinto(buffer):
                sink.write(view[:count])
                self.raw_size += count
        except OSError:  # zstd died (its stderr says why): stop pg_dump too
            self.dump.kill()
        finally:
            try:
                sink.close()
            except OSError:
                pass

    def finish(self) -> str:
        """Wait for zstd; its error message, or "" when it wrote the file."""
        if self.ident is not None:  # started
            self.join()
        errors = self.zstd.stderr.read().decode(errors="replace")
        return "" if self.zstd.wait() == 0 else f"zstd failed: {errors.strip() or self.zstd.returncode}"

    def kill(self) -> None:
        self.zstd.kill()


def recorded(record: dict) -> dict:
    """What drydock recorded on the database: its lineage (the backup a pull restored, on the
    local database). Not the scrub rules applied to it, which come from the run (`scrubbed`):
    a server's app role owns its database and may write its comment, and a forged record
    would send the real data to staging as a scrubbed copy."""
    return {"lineage": record.get("drydock_lineage")}


def database_files(folder: str, database: str) -> tuple[list[str], list[str]]:
    """The database's dumps in `folder` (those named <database>-<timestamp>.dump[.zst]),
    newest first, and the .partial files interrupted dumps of it left."""
    pattern = re.compile(re.escape(database) + r"-\d{8}T\d{6}Z\.dump(\.zst)?")
    names = os.listdir(folder)
    dumps = sorted((name for name in names if pattern.fullmatch(name)), reverse=True)
    partials = [name for name in names if name.endswith(".partial") and pattern.fullmatch(name[:-len(".partial")])]
    return dumps, partials


def expected_size(folder: str, earlier: list[str], database_size: int) -> tuple[int, str]:
    """How big the next dump is expected to be, and why: as its last one, or as the database."""
    if earlier:
        return os.path.getsize(os.path.join(folder, earlier[0])), "as big as its last dump"
    return database_size, "as big as the database, for a first dump"


def deletable(earlier: list[str], partials: list[str], keep: int) -> list[str]:
    """What a dump may delete to make room, in that order: the database's stale .partial
    files, then the dumps the rotation after it would delete anyway (the host keeps `keep`,
    the new one included; the controller holds the fetched copies)."""
    return partials + (earlier[keep - 1:] if keep > 0 else [])


def no_room(module, dest: str, free: int, expected: int, basis: str, min_free_mb: int, reserve: int = 0,
            ahead: bool = False, removed: tuple[str, ...] = ()) -> None:
    taken_first = f" once the restore has taken {bytes_to_human(reserve)}" if reserve else ""
    counted = " (counting the files it may delete)" if ahead else ""
    deleted = f"; {len(removed)} older file(s) of the database were deleted to make room" if removed else ""
    module.fail_json(msg=f"not enough disk on this host for the dump in {os.path.dirname(dest)}{taken_first}: "
                         f"{bytes_to_human(free)} free{counted}, about {bytes_to_human(expected)} expected ({basis}), "
                         f"and {min_free_mb} MB must stay free for the server (pg_backup_min_free_mb; "
                         f"0 turns this check off){deleted}", dump=dest, removed=list(removed))


def make_room(module, dest: str, database: str, database_size: int, min_free_mb: int, keep: int) -> list[str]:
    """Fail unless the dump's folder keeps `min_free_mb` free once the dump is written (0: no
    check), having deleted what it may, as little as it needs. Returns the files it deleted."""
    if min_free_mb <= 0:
        return []
    folder = os.path.dirname(dest)
    earlier, partials = database_files(folder, database)
    expected, basis = expected_size(folder, earlier, database_size)
    removed = remove(folder, partials)
    if free_bytes(folder) - expected < min_free_mb * 10**6:
        removed += remove(folder, deletable(earlier, [], keep))
    if free_bytes(folder) - expected < min_free_mb * 10**6:
        no_room(module, dest, free_bytes(folder), expected, basis, min_free_mb, removed=tuple(removed))
    return removed


def check_room(module, dest: str, database: str, database_size: int, min_free_mb: int, keep: int,
               reserve: int) -> None:
    """make_room's verdict ahead of the dump, once `reserve` bytes are taken, deleting nothing:
    the files it may delete count as free."""
    folder = os.path.dirname(dest)
    earlier, partials = database_files(folder, database) if os.path.isdir(folder) else ([], [])
    expected, basis = expected_size(folder, earlier, database_size)
    free = free_bytes(existing_parent(folder)) + sum(os.path.getsize(os.path.join(folder, name))
                                                      for name in deletable(earlier, partials, keep))
    if min_free_mb > 0 and free - reserve - expected < min_free_mb * 10**6:
        no_room(module, dest, free, expected, basis, min_free_mb, reserve, ahead=True)
    module.exit_json(changed=False, dump=dest, command=[], free_bytes=free, expected_bytes=expected)


def existing_parent(path: str) -> str:
    """`path`, or its nearest parent that exists (the first backup creates the folder)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def remove(folder: str, names: list[str]) -> list[str]:
    """Delete `names` in `folder`; the paths deleted (one that cannot be is left for the next run)."""
    removed = []
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            continue
    return removed


def rotate(dest: str, database: str, keep: int) -> list[str]:
    """Delete the database's dumps beside `dest` beyond the newest `keep` (0: keep all),
    and the .partial files that interrupted dumps left behind."""
    folder = os.path.dirname(dest)
    dumps, partials = database_files(folder, database)
    # Tidying up must not fail a good dump: a file that cannot be deleted is left for the next run.
    return remove(folder, (dumps[keep:] if keep > 0 else []) + partials)


def room_only(module, params: dict) -> None:
    """Whether the dump would have room once a restore into this server has taken
    `reserve_bytes` on its data directory's disk (counted if the dump's folder is on it)."""
    require_psycopg(module)
    import psycopg
    try:
        with connect(params["socket_dir"], params["port"], params["database"]) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            data_directory = conn.execute("SHOW data_directory").fetchone()[0]
    except psycopg.Error as error:
        module.fail_json(msg=" ".join(str(error).split()), dump=params["dest"])
    folder = existing_parent(os.path.dirname(params["dest"]))
    same_disk = os.stat(folder).st_dev == os.stat(data_directory).st_dev
    check_room(module, params["dest"], params["database"], size, params["min_free_mb"], params["keep"],
               params["reserve_bytes"] if same_disk else 0)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(APP_DATABASE_ARGS, dest=dict(type="path", required=True),
                           pg_bindir=dict(type="path", required=True), compress=dict(type="int", default=1),
                           compression=dict(type="str", default="zstd", choices=["zstd", "gzip"]),
                           keep=dict(type="int", default=0), min_free_mb=dict(type="int", default=0),
                           room_only=dict(type="bool", default=False), reserve_bytes=dict(type="int", default=0),
                           scrubbed=dict(type="list", elements="str", default=[])),
        supports_check_mode=True,
    )
    params = module.params
    dest = params["dest"]
    refuse_unless_plain_name(module, params["database"])
    if params["room_only"]:
        room_only(module, params)
    if module.check_mode:
        module.exit_json(changed=False, dump=dest, command=dump_command(params, "<snapshot>", dest))
    require_psycopg(module)
    import psycopg

    zstd = params["compression"] == "zstd"
    if zstd and not shutil.which("zstd"):
        module.fail_json(msg="zstd is not installed on this host: install it (apt install zstd), "
                             "or set pg_backup_compression: gzip", dump=dest)
    if os.path.exists(dest):
        module.fail_json(msg=f"refusing to overwrite an existing dump: {dest}", dump=dest)
    partial = dest + ".partial"
    os.umask(0o077)  # a dump is production data: 0600 from the first byte
    try:
        with connect(params["socket_dir"], params["port"], params["database"]) as conn:
            # Before any of the app's tables is read: the row counts below plan queries on them,
            # and planning evaluates an index expression's function called with constants.
            refuse_code_of_its_own(module, conn, "back up", dump=dest)
            made_room = make_room(module, dest, params["database"],
                                  conn.execute("SELECT pg_database_size(current_database())").fetchone()[0],
                                  params["min_free_mb"], params["keep"])
            # The write counters are read before the snapshot, in a transaction of their own. A
            # write committed in between is then in the dump but not counted, and a later
            # freshness check errs towards refusing. Read after it, a write committed while the
            # rows are counted would be counted but missing from the dump, and a push of this
            # dump would lose it without a word.
            with conn.cursor() as cur:
                fingerprint = write_fingerprint(cur)
            conn.commit()
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            with conn.cursor() as cur:
                cur.execute("SELECT pg_export_snapshot()")
                snapshot = cur.fetchone()[0]
                command = dump_command(params, snapshot, partial)
                # The snapshot lives as long as this transaction: pg_dump runs inside it, while
                # the manifest's other facts are read from the same snapshot.
                # Not the settings the database's owner chose for its sessions (SESSION_SETTINGS).
                proc = subprocess.Popen(command, stdout=subprocess.PIPE if zstd else subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=dict(os.environ, PGOPTIONS=SESSION_SETTINGS))
                compressor = None
                try:
                    if zstd:
                        compressor = Compressor(proc, params["compress"], partial)
                        compressor.start()
                    tables = ordinary_tables(cur)
                    facts = dict(row_counts=row_counts(cur), migrations=latest_migrations(cur),
                                 write_fingerprint=fingerprint, server_version=server_version(cur),
                                 database_size=conn.execute("SELECT pg_database_size(current_database())").fetchone()[0],
                                 scrubbed=params["scrubbed"], **recorded(database_comment(conn, params["database"])))
                except BaseException:
                    proc.kill()  # no manifest, no dump: do not wait for it
                    if compressor:
                        compressor.kill()
                    raise
                finally:
                    errors = proc.stderr.read().decode(errors="replace")
                    proc.wait()
                    compressor_error = compressor.finish() if compressor else ""
            # zstd's failure first: when zstd dies, pg_dump is killed and has nothing to say.
            if compressor_error:
                raise RuntimeError(compressor_error)
            if proc.returncode != 0:
                raise RuntimeError(f"pg_dump failed: {errors.strip()}")
        # Checked before it gets its final name: a dump under that name is always readable.
        try:
            toc = table_of_contents(params["pg_bindir"], partial, zstd=zstd)
        except DoesNotUnpack as error:  # zstd's words alone would not say which file
            raise RuntimeError(f"pg_restore --list cannot read {partial}: it does not unpack ({error})") from None
        toc_entries = count_entries(toc)
        if missing := tables_without_rows(toc, tables):
            raise RuntimeError(
                f"the dump of {params['database']} lacks the rows of {len(missing)} table(s) ({first_three(missing)}): "
                "pg_dump leaves out a table an extension claims (ALTER "
                "EXTENSION … ADD TABLE), and a Django/Wagtail database has none; read which extension holds it "
                "(docs/runbook.md, section 8)")
        version = subprocess.run([os.path.join(params["pg_bindir"], "pg_dump"), "--version"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        os.chmod(partial, 0o600)
        os.rename(partial, dest)
        removed = made_room + rotate(dest, params["database"], params["keep"])
    except (psycopg.Error, RuntimeError, OSError, subprocess.SubprocessError) as error:
        if os.path.exists(partial):
            os.unlink(partial)
        module.fail_json(msg=" ".join(str(error).split()), dump=dest)
    size = os.path.getsize(dest)
    module.exit_json(changed=True, dump=dest, command=command, sha256=sha256_file(dest), size=size,
                     raw_size=compressor.raw_size if compressor else size, toc_entries=toc_entries,
                     pg_dump_version=version, removed=removed, **facts)


if __name__ == "__main__":
    main()
