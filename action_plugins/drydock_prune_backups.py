"""Action: the controller's backup rotation, in the controller's own process.

As two tasks delegated to localhost (`find`, then `file state=absent` in a loop) it started
a module for each, about 1.5 s of every backup and so of every pull and push.
"""
from __future__ import annotations

DOCUMENTATION = r"""
name: drydock_prune_backups
short_description: Delete a controller folder's unfinished backups and those beyond the newest few
description:
  - Looks at the backup folders in C(folder), named by the time they were made
    (C(YYYYMMDDTHHMMSSZ)). One without its C(manifest.json) is what an interrupted fetch
    leaves, never a usable backup: it is deleted. Of the others, the newest C(keep) stay.
  - Symbolic links and anything not named like a backup are left alone.
  - Runs on the controller, whatever the task's host.
options:
  folder: {description: "The controller's folder of one environment's backups.", type: path, required: true}
  keep: {description: How many finished backups stay (at least 1)., type: int, required: true}
  spare:
    description:
      - Backup folders never deleted, whatever their names say: the one just made (a folder
        named later by a skewed clock or a copy would otherwise make it delete itself), and
        the one holding the dump being pushed (a push's safety backup must not delete it).
    type: list
    elements: path
    default: []
"""

import os
import re
import shutil

from ansible.plugins.action import ActionBase

BACKUP_NAME = re.compile(r"\d{8}T\d{6}Z\Z")


class ActionModule(ActionBase):
    _VALID_ARGS = frozenset(("folder", "keep", "spare"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        try:
            keep = int(args.get("keep"))
        except (TypeError, ValueError):
            keep = 0
        if not args.get("folder") or keep < 1:
            return dict(result, failed=True, msg="drydock_prune_backups needs a folder and keep of at least 1")
        folder = os.path.abspath(os.path.expanduser(str(args["folder"])))
        spare = {os.path.realpath(os.path.expanduser(str(path))) for path in args.get("spare") or []}
        try:
            doomed = [path for path in backups_to_delete(folder, keep) if os.path.realpath(path) not in spare]
            for path in doomed:
                shutil.rmtree(path)
        except OSError as error:
            return dict(result, failed=True, msg=f"could not prune the backups in {folder}: {error}")
        return dict(result, changed=bool(doomed), deleted=doomed)


def backups_to_delete(folder: str, keep: int) -> list[str]:
    """The unfinished backups in `folder`, and the finished ones beyond the newest `keep`."""
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        backups = sorted((entry.path for entry in entries
                          if BACKUP_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False)), reverse=True)
    finished = [path for path in backups if os.path.isfile(os.path.join(path, "manifest.json"))]
    unfinished = [path for path in backups if path not in finished]
    return sorted(unfinished + finished[keep:])
