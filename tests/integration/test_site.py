"""The Site switch: validated input, both Site tables, clear errors."""
import pytest

from tests.conftest import error_lines, inv, playbook

SITE = "SELECT hostname, port FROM wagtailcore_site WHERE is_default_site"


def test_switch_sets_wagtail_and_django_sites(pulled, connect):
    try:
        inv("site", "local", "preview.example.test", "--port", "8443", check=True)
        conn = connect("local")
        assert conn.execute(SITE).fetchone() == ("preview.example.test", 8443)
        assert conn.execute("SELECT domain FROM django_site WHERE id = 1").fetchone()[0] == "preview.example.test:8443"
    finally:
        inv("site", "local", "localhost", "--port", "8000", check=True)


@pytest.mark.parametrize("hostname", ["bad host", "x'; DROP TABLE wagtailcore_site; --", '"quoted"', "under_score.test", "trailing-.test"])
def test_bad_hostname_is_refused_with_one_line(pulled, connect, hostname):
    before = connect("local").execute(SITE).fetchone()
    proc = inv("site", "local", hostname)
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 1 and "invalid hostname" in proc.stderr
    assert connect("local").execute(SITE).fetchone() == before


def test_playbook_validates_the_hostname_itself(pulled, connect):
    before = connect("local").execute(SITE).fetchone()
    proc = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_hostname='bad host'")
    assert proc.returncode != 0 and "invalid Site hostname" in proc.stdout
    assert connect("local").execute(SITE).fetchone() == before


def test_database_without_site_table(pulled):
    proc = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_database=postgres")
    assert proc.returncode != 0 and "has no wagtailcore_site table" in proc.stdout


def test_no_matching_site_row(pulled):
    proc = playbook("site_hostname.yml", "--limit", "local", "-e", "wagtail_site_name=nosuchsite")
    assert proc.returncode != 0 and 'no Site named "nosuchsite"' in proc.stdout


def test_playbook_without_limit_is_refused(pulled):
    proc = playbook("site_hostname.yml", "-e", "wagtail_site_hostname=example.test")
    assert proc.returncode != 0 and "refusing to change the Site of 3 environments at once" in proc.stdout
