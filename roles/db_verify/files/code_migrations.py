"""Print the app's migrations as JSON: [app, name] pairs and a hash of their files and
of Django's version (what the schema they produce depends on, on the app's side), and the
database the app would connect to (the role migrates only when that is its scratch database).

Run in the app's own Python with its settings; reads the migration files only (no database).
"""
import hashlib
import json
import sys

import django
from app_database import connects_to  # beside this file

database = connects_to()  # sets Django up
from django.db.migrations.loader import MigrationLoader  # noqa: E402

loader = MigrationLoader(None, ignore_no_migrations=True)
digest = hashlib.sha256(django.get_version().encode())  # field SQL can change with Django
pairs = sorted(loader.disk_migrations)
for key in pairs:
    module = sys.modules[loader.disk_migrations[key].__module__]
    digest.update(repr(key).encode())
    with open(module.__file__, "rb") as handle:
        digest.update(handle.read())
print(json.dumps({"migrations": [list(pair) for pair in pairs], "hash": digest.hexdigest()[:16], **database}))
