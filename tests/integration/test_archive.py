"""Data offsets for dumps written through a pipe: the archive drydock unpacks for pg_restore gets
exactly the bytes pg_dump writes when it can seek, and a damaged one is refused untouched."""
import subprocess

import pytest

from drydock.paths import PG_BINDIR
from drydock_archive import ArchiveFormatError, add_data_offsets
from tests.conftest import connector, database_url

SCRATCH = "drydock_archive_check"
# Header of a version 1.14 archive (PG 12-15): magic, version, sizes and format (11 bytes), the
# compression level (an int: 5 bytes), then the creation date (7 ints), which differs per dump.
CREATION_DATE = slice(16, 16 + 7 * 5)


@pytest.fixture(scope="module")
def databases_to_dump(sandbox_env):
    """Production's site database, and a scratch one on the local server with large objects
    (their data blocks have their own layout)."""
    with connector(sandbox_env) as connect:
        admin = connect("local", "postgres")
        admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH}")
        admin.execute(f"CREATE DATABASE {SCRATCH}")
        scratch = connect("local", SCRATCH)
        scratch.execute("CREATE TABLE note (id int PRIMARY KEY, body text)")
        scratch.execute("INSERT INTO note SELECT i, repeat(md5(i::text), i % 50) FROM generate_series(1, 5000) i")
        scratch.execute("CREATE TABLE empty_one (id int)")
        scratch.execute("SELECT lo_from_bytea(0, convert_to(repeat('large object ', 20000), 'UTF8'))")
        scratch.execute("SELECT lo_from_bytea(0, '\\x00ff'::bytea)")
    yield {"production": database_url(sandbox_env, "production"),
           "with large objects": database_url(sandbox_env, "local", SCRATCH)}
    with connector(sandbox_env) as connect:
        connect("local", "postgres").execute(f"DROP DATABASE IF EXISTS {SCRATCH}")


def dump_twice(url: str, folder) -> tuple[bytes, bytes]:
    """The same database dumped to a file (pg_dump seeks back and writes the offsets) and
    through a pipe (it cannot), uncompressed as drydock's dumps are inside their zstd."""
    to_file = folder / "to_file.dump"
    subprocess.run([PG_BINDIR / "pg_dump", "--format=custom", "--compress=0", f"--file={to_file}", f"--dbname={url}"],
                   check=True)
    piped = subprocess.run([PG_BINDIR / "pg_dump", "--format=custom", "--compress=0", f"--dbname={url}"],
                           capture_output=True, check=True).stdout
    return to_file.read_bytes(), piped


def without_date(archive: bytes) -> bytes:
    return archive[:CREATION_DATE.start] + archive[CREATION_DATE.stop:]


@pytest.mark.parametrize("database", ["production", "with large objects"])
def test_a_piped_dump_gets_the_offsets_pg_dump_writes_to_a_file(databases_to_dump, database, tmp_path):
    from_file, piped = dump_twice(databases_to_dump[database], tmp_path)
    assert without_date(piped) != without_date(from_file), "the piped dump should lack the offsets"
    archive = tmp_path / "piped.dump"
    archive.write_bytes(piped)

    assert add_data_offsets(str(archive)) > 0
    assert without_date(archive.read_bytes()) == without_date(from_file)

    seekable = tmp_path / "to_file.dump"
    assert add_data_offsets(str(seekable)) == 0, "an archive with offsets is left as it is"
    assert seekable.read_bytes() == from_file


def test_an_archive_with_damaged_data_is_refused_untouched(databases_to_dump, tmp_path):
    _from_file, piped = dump_twice(databases_to_dump["with large objects"], tmp_path)
    archive = tmp_path / "piped.dump"
    cut = piped[:len(piped) * 2 // 3]  # ends inside a data block
    archive.write_bytes(cut)
    with pytest.raises(ArchiveFormatError, match="ends early"):
        add_data_offsets(str(archive))
    assert archive.read_bytes() == cut


def test_an_archive_cut_between_data_blocks_is_refused_untouched(databases_to_dump, tmp_path):
    """Cut where a block starts, the blocks that remain read whole: only the TOC, which lists
    entries whose data never came, shows that the archive is short."""
    import os

    import drydock_archive

    _from_file, piped = dump_twice(databases_to_dump["with large objects"], tmp_path)
    archive = tmp_path / "piped.dump"
    archive.write_bytes(piped)
    with open(archive, "rb") as handle:  # where each data block starts, as the module finds them
        cursor = drydock_archive._Cursor(handle, os.fstat(handle.fileno()).st_size)
        drydock_archive._toc_offset_fields(cursor, drydock_archive._header(cursor))
        positions = drydock_archive._data_block_positions(cursor)
    last_id, last_start = max(positions.items(), key=lambda item: item[1])
    cut = piped[:last_start]
    archive.write_bytes(cut)
    with pytest.raises(ArchiveFormatError, match=rf"\Ano data for its entries \[{last_id}\]\Z"):
        add_data_offsets(str(archive))
    assert archive.read_bytes() == cut


def test_an_archive_cut_inside_its_last_chunk_is_refused_untouched(databases_to_dump, tmp_path):
    """Cut a few bytes before its end, the last chunk's length runs past the end of the file:
    what it says it holds never came."""
    _from_file, piped = dump_twice(databases_to_dump["production"], tmp_path)
    archive = tmp_path / "piped.dump"
    cut = piped[:-8]  # the last chunk's end marker is 5 bytes: 3 more are its data
    archive.write_bytes(cut)
    with pytest.raises(ArchiveFormatError, match=rf"\Ait ends early, at byte {len(cut)}\Z"):
        add_data_offsets(str(archive))
    assert archive.read_bytes() == cut


def test_an_archive_version_not_known_here_is_left_alone(databases_to_dump, tmp_path):
    _from_file, piped = dump_twice(databases_to_dump["with large objects"], tmp_path)
    assert piped[5:7] == bytes([1, 14])
    newer = piped[:6] + bytes([99]) + piped[7:]
    archive = tmp_path / "newer.dump"
    archive.write_bytes(newer)
    assert add_data_offsets(str(archive)) == 0
    assert archive.read_bytes() == newer
