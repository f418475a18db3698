import pytest

from drydock import validate
from drydock.validate import InvalidInput


@pytest.mark.parametrize("name", ["localhost", "www.drydock-example.org", "a.b-c.d", "x1.test", "a" * 63 + ".com"])
def test_good_hostnames(name):
    assert validate.hostname(name) == name


@pytest.mark.parametrize("name", ["", "bad host", "x';--", '"q"', "-a.com", "a-.com", "a..b", "a" * 64 + ".com",
                                  "under_score.com", "host:8000", "ümlaut.de", "a\nb"])
def test_bad_hostnames(name):
    with pytest.raises(InvalidInput, match="invalid hostname"):
        validate.hostname(name)


@pytest.mark.parametrize("value, ok", [(1, True), ("443", True), (65535, True), (0, False), (65536, False), ("x", False)])
def test_ports(value, ok):
    if ok:
        assert validate.port(value) == int(value)
    else:
        with pytest.raises(InvalidInput):
            validate.port(value)


@pytest.mark.parametrize("name, ok", [("wagtail_site", True), ("_x1", True), ("Upper", False), ("a-b", False),
                                      ("a;drop", False), ("x" * 64, False), ("", False)])
def test_identifiers(name, ok):
    if ok:
        assert validate.identifier(name) == name
    else:
        with pytest.raises(InvalidInput):
            validate.identifier(name)
