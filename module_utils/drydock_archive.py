"""Give a custom-format archive written through a pipe the data offsets pg_dump could not.

pg_dump writes its table of contents (TOC) before the data. Writing to a file, it seeks back at
the end and fills in where each table's data starts; writing to a pipe (drydock's dumps go
through zstd) it cannot, and every entry says "offset not set". pg_restore then knows no sizes,
so `--jobs` starts tables in TOC order and the biggest one may start last and run alone (1.3 s
of a 7.5 s restore at 1 GB), and each worker scans the file for its data.

After the dump is unpacked on the restoring host, `add_data_offsets` walks the data blocks
(their chunks are length-prefixed, so no data is read, only the 5-byte lengths) and writes each
block's position into its TOC entry: the same bytes pg_dump writes when it can seek. A position
is only ever one found at a block header of that entry's dump id, and pg_restore checks the
block's id again when it seeks there, so a wrong offset would fail loudly rather than restore
the wrong data. Archive versions this does not know are left as they are (still restorable).

The format (PostgreSQL's src/bin/pg_dump/pg_backup_archiver.c and pg_backup_custom.c): an int
is a sign byte and `intSize` little-endian bytes; a string is an int length (-1: none) and
bytes; an offset is a flag byte and `offSize` little-endian bytes.
"""
from __future__ import annotations

import mmap
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


class _Reader:
    def __init__(self, data, int_size: int = 4) -> None:
        self.data = data
        self.pos = 0
        self.int_size = int_size

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ArchiveFormatError("archive ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def int(self) -> int:
        negative = self.byte()
        end = self.pos + self.int_size
        if end > len(self.data):
            raise ArchiveFormatError("archive ends early")
        value = int.from_bytes(self.data[self.pos:end], "little")
        self.pos = end
        return -value if negative else value

    def skip_str(self) -> bool:
        """Skip a string; False if it was the 'none' marker (-1)."""
        length = self.int()
        if length < 0:
            return False
        self.pos += length
        return True


def _toc_offset_fields(reader: _Reader, version: tuple[int, int], off_size: int) -> list[tuple[int, int, int]]:
    """(dump id, position of its offset field, offset flag) for each TOC entry."""
    entries = []
    for _ in range(reader.int()):
        dump_id = reader.int()
        reader.int()  # has a data dumper
        for _field in ("tableoid", "oid", "tag", "desc"):
            reader.skip_str()
        reader.int()  # section
        for _field in ("defn", "dropStmt", "copyStmt", "namespace", "tablespace", "tableam"):
            reader.skip_str()
        if version >= (1, 16):
            reader.int()  # relkind
        reader.skip_str()  # owner
        reader.skip_str()  # "false" (with oids)
        while reader.skip_str():  # dependencies, ended by a none
            pass
        field = reader.pos
        flag = reader.byte()
        reader.pos += off_size
        entries.append((dump_id, field, flag))
    return entries


def _skip_chunks(data, pos: int, chunk_header: struct.Struct) -> int:
    """Skip length-prefixed chunks up to and including the zero-length end marker."""
    unpack = chunk_header.unpack_from
    size = chunk_header.size
    while True:
        _sign, length = unpack(data, pos)
        pos += size
        if length == 0:
            return pos
        pos += length


def _data_block_positions(data, pos: int, int_size: int) -> dict[int, int]:
    """Where each data block starts, by dump id, walking from the end of the TOC."""
    chunk_header = struct.Struct({4: "<BI", 8: "<BQ"}[int_size])
    positions = {}
    end = len(data)
    try:
        while pos < end:
            start = pos
            block_type = data[pos]
            _sign, dump_id = chunk_header.unpack_from(data, pos + 1)
            pos += 1 + chunk_header.size
            if block_type == BLOCK_DATA:
                pos = _skip_chunks(data, pos, chunk_header)
            elif block_type == BLOCK_BLOBS:
                while True:  # each large object: its oid, then its chunks; an oid of 0 ends them
                    _sign, oid = chunk_header.unpack_from(data, pos)
                    pos += chunk_header.size
                    if oid == 0:
                        break
                    pos = _skip_chunks(data, pos, chunk_header)
            else:
                raise ArchiveFormatError(f"unknown block type {block_type} at byte {start}")
            positions[dump_id] = start
    except struct.error as error:
        raise ArchiveFormatError("archive ends inside a data block") from error
    if pos != end:
        raise ArchiveFormatError("archive ends inside a data block")
    return positions


def add_data_offsets(path: str) -> int:
    """Fill in the data offsets of the custom-format archive at `path`, in place. Returns how
    many entries got one (0 when the archive has them already or has a version not known here).
    Raises ArchiveFormatError when the archive is not the shape its header says."""
    with open(path, "r+b") as archive:
        size = os.fstat(archive.fileno()).st_size
        if size == 0:
            raise ArchiveFormatError("archive is empty")
        with mmap.mmap(archive.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ) as data:
            if data[:5] != MAGIC or data[8] not in (4, 8) or data[10] != CUSTOM_FORMAT:
                return 0
            version, int_size, off_size = (data[5], data[6]), data[8], data[9]
            if version not in KNOWN_VERSIONS or off_size != 8:
                return 0
            reader = _Reader(data, int_size)
            reader.pos = 11
            if version >= (1, 15):
                reader.byte()  # compression algorithm
            else:
                reader.int()  # compression level
            for _field in range(7):  # creation date: sec, min, hour, mday, mon, year, isdst
                reader.int()
            for _field in ("database", "server version", "pg_dump version"):
                reader.skip_str()
            entries = _toc_offset_fields(reader, version, off_size)
            unset = [entry for entry in entries if entry[2] == OFFSET_NOT_SET]
            if not unset:
                return 0
            positions = _data_block_positions(data, reader.pos, int_size)
        missing = [dump_id for dump_id, _field, _flag in unset if dump_id not in positions]
        if missing:
            raise ArchiveFormatError(f"no data block for TOC entries {missing[:5]}")
        for dump_id, field, _flag in unset:
            os.pwrite(archive.fileno(), bytes([OFFSET_SET]) + positions[dump_id].to_bytes(off_size, "little"), field)
    return len(unset)
