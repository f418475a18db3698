"""callback_plugins/drydock_module_cache: the module payloads Ansible builds are kept between
runs, and a module whose code changed is never sent as it was. Real ansible-playbook runs
on this machine (connection local), with a module of the test's own."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drydock.playbook import ansible_env
from drydock.paths import project_root

MODULE = '''#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drydock_cache_probe_prefix import PREFIX
AnsibleModule(argument_spec={}).exit_json(changed=False, answer=PREFIX + "{answer}")
'''
PLAYBOOK = """- hosts: localhost
  gather_facts: false
  tasks:
    - drydock_cache_probe:
      register: probe
    - ansible.builtin.debug:
        msg: "answer={{ probe.answer }}"
"""
PAYLOAD = "ansible.legacy.drydock_cache_probe-ZIP_DEFLATED-none"
NOT_CACHED = "drydock_module_cache: building modules per run"


@pytest.fixture
def world(tmp_path):
    """run(answer, prefix="", playbook=PLAYBOOK) runs a playbook whose module answers
    `prefix + answer`, the prefix from a module_utils file of its own; its output.
    paths["cache"] is the DRYDOCK_MODULE_CACHE it runs with."""
    library, module_utils = tmp_path / "library", tmp_path / "module_utils"
    library.mkdir()
    module_utils.mkdir()
    paths = {"cache": tmp_path / "runs" / "cache" / "ansible-modules"}

    def run(answer: str, prefix: str = "", playbook: str = PLAYBOOK) -> str:
        (tmp_path / "play.yml").write_text(playbook)
        (library / "drydock_cache_probe.py").write_text(MODULE.replace("{answer}", answer))
        (module_utils / "drydock_cache_probe_prefix.py").write_text(f"PREFIX = {prefix!r}\n")
        env = dict(ansible_env(), DRYDOCK_MODULE_CACHE=str(paths["cache"]), ANSIBLE_LIBRARY=str(library),
                   ANSIBLE_MODULE_UTILS=str(module_utils), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"))
        proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", "-e",
                               json.dumps({"ansible_python_interpreter": sys.executable}), str(tmp_path / "play.yml")],
                              cwd=project_root(), env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    return run, paths


def test_a_module_is_built_once_and_built_again_when_its_code_changes(world):
    run, paths = world
    cache = paths["cache"]
    assert "answer=one" in run("one")
    (first,) = cache.iterdir()
    payload = first / PAYLOAD
    built = payload.stat().st_ino
    assert oct(cache.stat().st_mode & 0o777) == oct(first.stat().st_mode & 0o777) == "0o700"
    assert "answer=one" in run("one")
    assert payload.stat().st_ino == built  # taken from the cache, not written again
    assert "answer=two" in run("two")  # never the payload built from the old code
    assert "answer=new two" in run("two", prefix="new ")  # nor from an old module_utils file
    assert len(list(cache.iterdir())) == 3


def test_a_cache_named_relative_to_the_working_directory_is_used(world, tmp_path):
    run, paths = world
    paths["cache"] = Path(os.path.relpath(tmp_path / "relative", project_root()))
    output = run("one")
    assert "answer=one" in output and NOT_CACHED not in output
    assert (tmp_path / "relative" / next((tmp_path / "relative").iterdir()).name / PAYLOAD).exists()


def test_a_folder_of_an_older_key_still_in_use_is_kept(world):
    import fcntl

    run, paths = world
    cache = paths["cache"]
    run("one")
    (old,) = cache.iterdir()
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    with open(old / ".in-use") as held:  # as a run of the older code still going would
        fcntl.flock(held, fcntl.LOCK_SH)
        run("two")
        assert old.exists()
    run("two")
    assert not old.exists()


def test_a_module_name_in_two_folders_is_not_cached(world, tmp_path):
    """Which of the two a task gets depends on the roles its playbook loads, and Ansible keeps
    one payload per name."""
    run, paths = world
    role_library = tmp_path / "roles" / "some_role" / "library"
    role_library.mkdir(parents=True)
    (role_library / "drydock_cache_probe.py").write_text("# another module of the same name\n")
    output = run("one")
    assert "answer=one" in output and NOT_CACHED in output and "drydock_cache_probe is both " in output
    assert not paths["cache"].exists() or not list(paths["cache"].glob("*/" + PAYLOAD))


def test_a_key_nobody_used_for_a_day_goes_and_the_one_in_use_stays(world):
    run, paths = world
    cache = paths["cache"]
    run("one")
    (old,) = cache.iterdir()
    run("two")
    (new,) = set(cache.iterdir()) - {old}
    day_ago = time.time() - 25 * 3600
    for folder in (old, new):
        os.utime(folder, (day_ago, day_ago))
    run("two")
    assert list(cache.iterdir()) == [new]


def test_a_cache_others_may_write_to_is_not_used(world):
    """Its payloads run on the hosts as root: a folder another user could write to, or put
    another folder in place of, is refused, and the run builds its modules as Ansible always does."""
    run, paths = world
    cache = paths["cache"]
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    output = run("one")
    assert "answer=one" in output and NOT_CACHED in output and "is not a 0700 folder" in output
    assert list(cache.iterdir()) == []
    cache.chmod(0o700)
    cache.parent.chmod(0o777)  # runs/cache: anyone could rename ansible-modules and put theirs there
    output = run("one")
    assert "answer=one" in output and NOT_CACHED in output and "is writable by other users" in output
    assert list(cache.iterdir()) == []


def test_only_folders_it_made_are_ever_dropped_and_a_payload_cut_short_is_built_again(world):
    """DRYDOCK_MODULE_CACHE may name a folder holding other things; a crash can leave a payload
    cut short (Ansible does not sync it), which would fail every later task of its module."""
    run, paths = world
    cache = paths["cache"]
    cache.mkdir(mode=0o700, parents=True)
    mine = cache / "notes-of-the-user"
    mine.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(mine, (day_ago, day_ago))
    run("one")
    (folder,) = set(cache.iterdir()) - {mine}
    payload = folder / PAYLOAD
    payload.write_bytes(payload.read_bytes()[:1000])
    assert "answer=one" in run("one")
    assert mine.exists() and len(payload.read_bytes()) > 1000


def test_a_module_edited_while_a_run_goes_on_is_not_kept_under_the_key_of_before(world, tmp_path):
    """The run began with the code answering "one", and its module was built (when first used)
    from the code edited since: a later run of the code of before must not get that build."""
    run, paths = world
    edit_first = PLAYBOOK.replace("  tasks:\n", "  tasks:\n    - ansible.builtin.copy:\n"
                                  f"        dest: {tmp_path / 'library' / 'drydock_cache_probe.py'}\n"
                                  f"        content: {json.dumps(MODULE.replace('{answer}', 'edited'))}\n", 1)
    output = run("one", playbook=edit_first)
    assert "answer=edited" in output and "module code changed during the run" in output
    assert "answer=one" in run("one")
