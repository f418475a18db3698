"""Checks for anything a user types that later reaches SQL, a shell or a file name."""
import json
import re
from urllib.parse import unquote, urlsplit

# RFC 1123 host names (labels of letters, digits and inner hyphens), or "localhost".
# The same pattern guards the playbooks (roles/wagtail_site/tasks/preflight.yml, library/drydock_site.py).
_HOSTNAME = re.compile(r"(?=.{1,253})([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# Snapshot names become part of a database name: <db>__snap_<name>. No "__" in them: drydock
# adds __old to a name it sets aside, and looks for __snap_ and __ready_ (pre_pull__old would be
# the name the pull sets pre_pull aside under, and dropped by it).
_SNAPSHOT = re.compile(r"(?!.*__)[a-z0-9][a-z0-9_]{0,29}")
_ENV_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
ENV_NAME_RULE = "an environment is named in lower-case letters, digits, - and _, starting with a letter (at most 32)"
# A URL whose every part is where a reader looks for it: scheme://[userinfo@]host[:port] and
# then a path, query or fragment without an @. A password with an unencoded / ? # or @ moves a
# piece of it into the host or the port, where urlsplit's error would quote it, or past them,
# where no check sees a password (mysite:2024/secret@host reads as host mysite, port 2024);
# such a URL is refused in words that quote nothing (so is a key=value DSN).
# The app_url_guard role holds the same pattern.
# No # anywhere: libpq gives it no meaning, so a password= after one would still be read,
# past every check of the query (which urlsplit ends at the #).
_URL_SHAPE = re.compile(r"(?s)[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*@)?(\[[^\]/?#@]*\]|[^/?#@:\[\]]*)(:[0-9]*)?([/?][^@#]*)?\Z")
NOT_A_URL = ("drydock_app_database_url is not a URL of the form postgresql://USER@HOST:PORT/DATABASE?PARAMETERS "
             "(a / ? # @ or : inside a part must be percent-encoded); it is not shown here, as it may hold a password")


class InvalidInput(ValueError):
    """Bad user input; the message is one line, fit to show as is."""


def hostname(value: str) -> str:
    """The host name, lower-cased as Wagtail matches it (and drydock_site stores it)."""
    if not isinstance(value, str) or len(value) > 253 or not _HOSTNAME.fullmatch(value):
        raise InvalidInput(f"invalid hostname {value!r}: a DNS name is labels of letters, digits and inner "
                           "hyphens (at most 63 characters each) joined by single dots, at most 253 in all")
    return value.lower()


def count(value: int | str, what: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid {what} {value!r}: not a number") from None
    if number < minimum:
        raise InvalidInput(f"invalid {what} {number}: at least {minimum}")
    return number


def port(value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid port {value!r}: not a number") from None
    if not 1 <= number <= 65535:
        raise InvalidInput(f"invalid port {number}: must be between 1 and 65535")
    return number


def is_environment_name(value: str) -> bool:
    return bool(_ENV_NAME.fullmatch(value or ""))


def environment_name(value: str) -> str:
    if not is_environment_name(value):
        raise InvalidInput(f"invalid environment name {value!r}: {ENV_NAME_RULE}")
    return value


def snapshot_name(value: str) -> str:
    if not _SNAPSHOT.fullmatch(value or ""):
        raise InvalidInput(f"invalid snapshot name {value!r}: use lower-case letters, digits and single _ (at most 30)")
    return value


def is_template(value) -> bool:
    """An inventory value Ansible would render (Jinja), as `ansible-inventory --list` prints it."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def app_database_url(url: str, variable: str = "DATABASE_URL") -> str:
    """The app's database URL, refused as the app_url_guard role refuses it in the playbooks
    (a templated value is left to them): with a password, which the app's commands would get
    on their command line, where the process list shows it; with a dbname= or service=
    parameter, which the driver reads over the database the path names; and `variable`, the
    environment variable it goes in, unless it is a name (it goes on that command line
    unquoted)."""
    # In the guard's order, and in its words (tests/unit/test_validate.py holds them to both).
    templated = is_template(url)
    if not templated and not _URL_SHAPE.match(url):
        raise InvalidInput(NOT_A_URL)
    try:
        parts = urlsplit("" if templated else url)
        parts.port  # noqa: B018 - the guard's urlsplit filter reads every part: a bad port fails it too
    except ValueError:  # a port beyond 65535: the guard fails on it in Ansible's words
        raise InvalidInput(NOT_A_URL) from None
    # libpq decodes a parameter's name too: pass%77ord= is password=
    query = unquote(parts.query)
    if parts.password is not None or re.search(r"(^|&)(ssl)?password=", query):
        raise InvalidInput("drydock_app_database_url holds a password, and the app's commands get the URL on their "
                           "command line (the process list shows it): leave it out and put it in a passfile "
                           "(~/.pgpass of the user the app runs as, or ?passfile=PATH in the URL)")
    if not is_template(variable) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
        raise InvalidInput(f"drydock_app_database_url_env must be an environment variable's name (letters, digits and _,"
                           f" not first a digit), not {json.dumps(variable)}")
    if re.search(r"(^|&)(dbname|service)=", query):
        raise InvalidInput("drydock_app_database_url has a dbname= or service= parameter, which the driver reads over"
                           " the database its path names: name the database in the path only")
    return url
