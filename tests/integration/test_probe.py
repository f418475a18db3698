"""The bench's downtime probe keeps its connection between queries: it must still see the
runbook's downtime (the database dropped, then created and loaded again) and the moment of
drydock's swap, in which the live database's sessions are ended."""
import time

import pytest

import drydock_pg
from bench.probe import APPLICATION_NAME, DowntimeProbe
from tests.conftest import connector, database_url

LIVE, INCOMING, PREVIOUS = "probe_live", "probe_incoming", "probe_previous"


def create_site_database(admin, name: str) -> None:
    admin.execute(f"CREATE DATABASE {name}")


def load_site(sandbox_env, name: str) -> None:
    """Tables the probe's query answers on: a default Site and its root page."""
    with connector(sandbox_env) as connect:
        db = connect("local", name)
        db.execute("CREATE TABLE wagtailcore_page (id int PRIMARY KEY)")
        db.execute("CREATE TABLE wagtailcore_site (hostname text, root_page_id int, is_default_site boolean)")
        db.execute("INSERT INTO wagtailcore_page VALUES (1)")
        db.execute("INSERT INTO wagtailcore_site VALUES ('localhost', 1, true)")


@pytest.fixture
def admin(sandbox_env):
    with connector(sandbox_env) as connect:
        conn = connect("local", "postgres")
        for name in (LIVE, INCOMING, PREVIOUS):
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        create_site_database(conn, LIVE)
        load_site(sandbox_env, LIVE)
        yield conn
        for name in (LIVE, INCOMING, PREVIOUS):
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_probe_sees_a_database_dropped_and_loaded_again(sandbox_env, admin):
    with DowntimeProbe(database_url(sandbox_env, "local", LIVE)) as probe:
        time.sleep(0.3)
        admin.execute(f"DROP DATABASE {LIVE} WITH (FORCE)")  # the runbook's dropdb --force
        time.sleep(1.0)
        create_site_database(admin, LIVE)  # createdb: the database is back, empty
        time.sleep(0.5)
        load_site(sandbox_env, LIVE)  # psql has loaded the tables
        answers_before = probe.successes
        time.sleep(0.3)
        answers_after = probe.successes - answers_before
    assert probe.longest_gap_s >= 1.5, probe.longest_gap_s
    assert probe.failures > 0
    assert answers_after > 0  # it connected again and answers from the loaded database


def test_the_probe_is_cut_by_a_swap_and_answers_again_from_the_new_database(sandbox_env, admin):
    create_site_database(admin, INCOMING)
    load_site(sandbox_env, INCOMING)
    sessions = ("SELECT datname, count(*) FROM pg_stat_activity WHERE datname IN (%s, %s)"
                " AND application_name = %s GROUP BY datname")
    with DowntimeProbe(database_url(sandbox_env, "local", LIVE)) as probe:
        time.sleep(0.3)
        live_oid = admin.execute("SELECT oid FROM pg_database WHERE datname = %s", (LIVE,)).fetchone()[0]
        ended = drydock_pg.swap_in(admin, LIVE, INCOMING, PREVIOUS)  # drydock's swap, as the push runs it
        time.sleep(0.3)
        now = dict(admin.execute(sessions, (LIVE, PREVIOUS, APPLICATION_NAME)).fetchall())
        swapped_in = admin.execute("SELECT oid FROM pg_database WHERE datname = %s", (LIVE,)).fetchone()[0]
    assert swapped_in != live_oid
    assert ended >= 1  # the probe's kept session was one of those ended
    assert probe.cuts >= 1  # ... and its next query saw it
    assert now == {LIVE: 1}  # it connected again, by name, to the database swapped in, and stays
    assert probe.longest_gap_s < 1.0
