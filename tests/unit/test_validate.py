import pytest

from drydock import validate
from drydock.validate import InvalidInput


@pytest.mark.parametrize("name", ["localhost", "www.drydock-example.org", "a.b-c.d", "x1.test", "a" * 63 + ".com"])
def test_good_hostnames(name):
    assert validate.hostname(name) == name


@pytest.mark.parametrize("name", ["", "bad host", "x';--", '"q"', "-a.com", "a-.com", "a..b", "a" * 64 + ".com",
                                  "under_score.com", "host:8000", "ümlaut.de", "a\nb", "example.org\n", "trailing-.test"])
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


@pytest.mark.parametrize("value, ok", [(1, True), ("5", True), (0, False), ("x", False), (None, False)])
def test_counts(value, ok):
    if ok:
        assert validate.count(value, "--keep") == int(value)
    else:
        with pytest.raises(InvalidInput, match="--keep"):
            validate.count(value, "--keep")


@pytest.mark.parametrize("name, ok", [("production", True), ("stage-2", True), ("production\n", False),
                                      ("Prod", False), ("a b", False), ("", False)])
def test_environment_names(name, ok):
    if ok:
        assert validate.environment_name(name) == name
    else:
        with pytest.raises(InvalidInput):
            validate.environment_name(name)
