"""Print, as JSON, the database the app would connect to: {"database": ..., "service": ...}.

Asked of Django itself, not read from the URL: its settings' OPTIONS (a URL's ?dbname=) go
over NAME, and settings may read another variable or name the database themselves. The key
is "dbname" from Django 4.2, "database" before. A service names its database in a file,
which cannot be told here: the callers refuse it. Run in the app's own Python with its
settings, by verify (through code_migrations.py) and by the migration step's preflight.
"""
import json


def connects_to() -> dict:
    import django

    django.setup()
    from django.db import connection

    params = connection.get_connection_params()
    return {"database": params.get("dbname") or params.get("database"), "service": params.get("service")}


if __name__ == "__main__":
    print(json.dumps(connects_to()))
