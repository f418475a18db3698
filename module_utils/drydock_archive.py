"""Give a custom-format archive written through a pipe the data offsets pg_dump could not.

pg_dump writes its table of contents (TOC) before the data. Writing to a file, it seeks back
at the end and fills in where each table's data starts; writing to a pipe (drydock's dumps
go through zstd) it cannot, and every entry says "offset not set". pg_restore then knows no
sizes, so `--jobs` starts tables in TOC order and the biggest one may start last and run
alone (1.3 s of a 7.5 s restore at 1 GB), and each worker scans the file for its data.

After the dump is unpacked on the restoring host, `add_data_offsets` walks the data blocks
(their chunks are length-prefixed: only the lengths are looked at, through one fixed 8 MiB
buffer, so memory stays flat) and writes each block's position into its TOC entry: the same
bytes pg_dump writes when it can seek. A position is only ever one found at a block header
of that entry's dump id, and pg_restore checks the block's id again when it seeks there, so
a wrong offset would fail loudly rather than restore the wrong data. Nothing is written
until the whole archive has been walked. Archive versions this does not know are left as
they are (still restorable).

The format (PostgreSQL's src/bin/pg_dump/pg_backup_archiver.c and pg_backup_custom.c): an int
is a sign byte and `intSize` little-endian bytes; a string is an int length (-1: none) and
bytes; an offset is a flag byte and `offSize` little-endian bytes.
"""
from __future__ import annotations

import os
import struct

MAGIC = b"PGDMP"
CUSTOM_FORMAT = 1
# Versions 1.14 (PG 12-15), 1.15 (PG 16: compression algorithm byte in the header) and
# 1.16 (PG 17-18: relkind int in each TOC entry).
KNOWN_VERSIONS = {(1, 14), (1, 15), (1, 16)}
OFFSET_NOT_SET, OFFSET_SET = 1, 2
BLOCK_DATA, BLOCK_BLOBS = 1, 3


class ArchiveFormatError(Exception):
    """The archive does not have the shape its header promises."""


class _Cursor:
    """Reads an archive through one fixed buffer, so memory stays flat whatever its size; the
    data itself is skipped by its lengths, never looked at."""

    BUFFER = 8 << 20

    def __init__(self, archive, size: int) -> None:
        self.archive = archive
        self.size = size
        self.buffer = bytearray(self.BUFFER)
        self.base = self.filled = 0  # the buffer holds the archive's bytes [base, base + filled)
        self.pos = 0
        self.header = struct.Struct("<BI")  # an int: sign byte, value (intSize 4 until the header says)

    def set_int_size(self, int_size: int) -> None:
        self.header = struct.Struct({4: "<BI", 8: "<BQ"}[int_size])

    def _at(self, size: int) -> int:
        """Buffer index of the `size` bytes at pos, refilling from pos if they are not all in."""
        if self.pos < self.base or self.pos + size > self.base + self.filled:
            if self.pos + size > self.size:
                raise ArchiveFormatError(f"it ends early, at byte {self.size}")
            self.archive.seek(self.pos)
            self.base, self.filled = self.pos, self.archive.readinto(self.buffer)
        return self.pos - self.base

    def byte(self) -> int:
        value = self.buffer[self._at(1)]
        self.pos += 1
        return value

    def int(self) -> int:
        negative, value = self.header.unpack_from(self.buffer, self._at(self.header.size))
        self.pos += self.header.size
        return -value if negative else value

    def skip_str(self) -> bool:
        """Skip a string; False if it was the 'none' marker (-1)."""
        length = self.int()
        if length < 0:
            return False
        self.pos += length
        return True

    def skip_chunks(self) -> None:
        """Skip length-prefixed chunks up to and including the zero-length end marker."""
        unpack, size = self.header.unpack_from, self.header.size
        while True:
            _sign, length = unpack(self.buffer, self._at(size))
            self.pos += size + length
            if length == 0:
                return


def _header(cursor: _Cursor) -> tuple[int, int] | None:
    """Read the archive's header; its version, or None if it is not one this file knows."""
    magic = bytes(cursor.byte() for _ in range(len(MAGIC)))
    version = (cursor.byte(), cursor.byte())
    cursor.byte()  # revision
    int_size, off_size, archive_format = cursor.byte(), cursor.byte(), cursor.byte()
    if magic != MAGIC or archive_format != CUSTOM_FORMAT or version not in KNOWN_VERSIONS \
            or int_size not in (4, 8) or off_size != 8:
        return None
    cursor.set_int_size(int_size)
    if version >= (1, 15):
        cursor.byte()  # compression algorithm
    else:
        cursor.int()  # compression level
    for _field in range(7):  # creation date: sec, min, hour, mday, mon, year, isdst
        cursor.int()
    for _field in ("database", "server version", "pg_dump version"):
        cursor.skip_str()
    return version


def _toc_offset_fields(cursor: _Cursor, version: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(dump id, position of its offset field, offset flag) for each TOC entry."""
    entries = []
    for _ in range(cursor.int()):
        dump_id = cursor.int()
        cursor.int()  # has a data dumper
        for _field in ("tableoid", "oid", "tag", "desc"):
            cursor.skip_str()
        cursor.int()  # section
        for _field in ("defn", "dropStmt", "copyStmt", "namespace", "tablespace", "tableam"):
            cursor.skip_str()
        if version >= (1, 16):
            cursor.int()  # relkind
        cursor.skip_str()  # owner
        cursor.skip_str()  # "false" (with oids)
        while cursor.skip_str():  # dependencies, ended by a none
            pass
        field = cursor.pos
        flag = cursor.byte()
        cursor.pos += 8  # the offset
        entries.append((dump_id, field, flag))
    return entries


def _data_block_positions(cursor: _Cursor) -> dict[int, int]:
    """Where each data block starts, by dump id, walking from the end of the TOC to the end."""
    positions = {}
    while cursor.pos < cursor.size:
        start = cursor.pos
        block_type = cursor.byte()
        dump_id = cursor.int()
        if block_type == BLOCK_DATA:
            cursor.skip_chunks()
        elif block_type == BLOCK_BLOBS:
            while cursor.int() != 0:  # each large object: its oid, then its chunks; an oid of 0 ends them
                cursor.skip_chunks()
        else:
            raise ArchiveFormatError(f"unknown block type {block_type} at byte {start}")
        positions[dump_id] = start
    if cursor.pos != cursor.size:  # the last chunk's length runs past the end
        raise ArchiveFormatError(f"it ends early, at byte {cursor.size}")
    return positions


def add_data_offsets(path: str) -> int:
    """Fill in the data offsets of the custom-format archive at `path`, in place. Returns how
    many entries got one (0 when the archive has them already or has a version not known here).
    Raises ArchiveFormatError when the archive is not the shape its header says."""
    with open(path, "r+b", buffering=0) as archive:
        cursor = _Cursor(archive, os.fstat(archive.fileno()).st_size)
        version = _header(cursor)
        if version is None:
            return 0
        unset = [entry for entry in _toc_offset_fields(cursor, version) if entry[2] == OFFSET_NOT_SET]
        if not unset:
            return 0
        positions = _data_block_positions(cursor)
        missing = [dump_id for dump_id, _field, _flag in unset if dump_id not in positions]
        if missing:
            raise ArchiveFormatError(f"no data for its entries {missing[:5]}")
        for dump_id, field, _flag in unset:
            os.pwrite(archive.fileno(), bytes([OFFSET_SET]) + positions[dump_id].to_bytes(8, "little"), field)
    return len(unset)
