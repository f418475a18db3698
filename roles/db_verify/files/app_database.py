"""Print, as JSON, the database the app would connect to: {"database": ..., "service": ...};
with --server, also the server it reaches ("server": its system identifier and start time).

Asked of Django itself, not read from the URL: its settings' OPTIONS (a URL's ?dbname=) go
over NAME, and settings may read another variable or name the database themselves. The key
is "dbname" from Django 4.2, "database" before. A service names its database in a file,
which cannot be told here: the callers refuse it. Run in the app's own Python with its
settings, by verify (through code_migrations.py) and by the migration step's preflight.
"""
import json
import sys


def connects_to() -> dict:
    import django

    django.setup()
    from django.db import connection

    params = connection.get_connection_params()
    return {"database": params.get("dbname") or params.get("database"), "service": params.get("service")}


# Which cluster a session is on: its system identifier (one per initdb) and when its
# postmaster started. Both readable by any role. The migration step's preflight asks the
# local cluster the same over drydock's own socket.
SERVER_IDENTITY = ("SELECT system_identifier::text || ' ' || extract(epoch FROM pg_postmaster_start_time())::text"
                   " FROM pg_control_system()")


def server() -> str:
    """The server the app's settings reach: a host or port in its URL may name another
    cluster, with a database of the same name. One line on stderr, and exit status 1, when
    it cannot be reached: the caller reports stderr's last line, not a traceback's."""
    from django.db import OperationalError, connection

    try:
        with connection.cursor() as cursor:
            cursor.execute(SERVER_IDENTITY)
            return cursor.fetchone()[0]
    except OperationalError as error:
        # psycopg's words name the address and the reason (Connection refused, no such database...).
        reason = " ".join(str(error).split()).removeprefix("connection failed: ")
        sys.exit(f"the app cannot reach its database: {reason}")


if __name__ == "__main__":
    answer = connects_to()
    if "--server" in sys.argv[1:]:
        answer["server"] = server()
    print(json.dumps(answer))
