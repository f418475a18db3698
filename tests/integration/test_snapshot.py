"""Snapshots of the local database: exact round trips, validated names, no cross-database restores."""
import pytest

from tests.conftest import databases, error_lines, fingerprint, inv, playbook


@pytest.fixture
def clean_snapshots(pulled):
    yield
    for name in ("saved", "foreign"):
        inv("snapshot.delete", name)


def test_save_change_restore_gives_back_the_saved_data(clean_snapshots, connect):
    saved = fingerprint(connect("local"))
    inv("snapshot.save", "saved", check=True)
    conn = connect("local")
    conn.execute("DELETE FROM taggit_taggeditem")
    conn.execute("UPDATE blog_post SET body = 'changed'")
    assert fingerprint(conn) != saved
    conn.close()
    inv("snapshot.restore", "saved", check=True)
    assert fingerprint(connect("local")) == saved
    assert "wagtail_site__previous" in databases(connect("local"))  # what the restore replaced


def test_list_shows_size_and_age(clean_snapshots):
    inv("snapshot.save", "saved", check=True)
    listing = inv("snapshot.list", check=True).stdout.splitlines()
    assert listing[0].split() == ["name", "of", "database", "size", "age"]
    row = next(line.split() for line in listing if line.startswith("saved "))
    assert row[1] == "wagtail_site" and row[3] == "MB" and row[5] == "min"


def test_existing_name_needs_force(clean_snapshots):
    inv("snapshot.save", "saved", check=True)
    refused = inv("snapshot.save", "saved")
    assert refused.returncode == 1 and "exists already" in error_lines(refused)[-1]
    inv("snapshot.save", "saved", "--force", check=True)


def test_snapshot_of_another_database_is_refused(clean_snapshots, connect):
    conn = connect("local")
    conn.execute("DROP DATABASE IF EXISTS otherdb")
    conn.execute("CREATE DATABASE otherdb")
    try:
        made = playbook("snapshot.yml", "-e", "pg_snapshot_action=save", "-e", "pg_snapshot_name=foreign",
                        "-e", "pg_snapshot_database=otherdb")
        assert made.returncode == 0, made.stdout[-2000:]
        before = fingerprint(connect("local"))
        proc = inv("snapshot.restore", "foreign")
        assert proc.returncode == 1
        assert "was taken of database otherdb, not wagtail_site" in error_lines(proc)[-1]
        assert fingerprint(connect("local")) == before
    finally:
        playbook("snapshot.yml", "-e", "pg_snapshot_action=delete", "-e", "pg_snapshot_name=foreign",
                 "-e", "pg_snapshot_database=otherdb")
        conn.execute("DROP DATABASE IF EXISTS otherdb")


@pytest.mark.parametrize("name", ["Bad", "a-b", "x" * 31, "semi;colon"])
def test_bad_names_get_one_line(sandbox_env, name):
    proc = inv("snapshot.save", name)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1 and "invalid snapshot name" in proc.stderr


def test_missing_snapshot(pulled):
    proc = inv("snapshot.restore", "nosuch")
    assert proc.returncode == 1 and "no snapshot nosuch of wagtail_site" in error_lines(proc)[-1]
