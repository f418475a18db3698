"""callback_plugins/drydock_module_cache: the module payloads Ansible builds are kept between
runs, and a module whose code changed is never sent as it was. Real ansible-playbook runs
on this machine (connection local), with a module of the test's own."""
import json
import os
import subprocess
import sys
import time

import pytest

from drydock.playbook import ansible_env
from drydock.paths import project_root

MODULE = '''#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule
AnsibleModule(argument_spec={}).exit_json(changed=False, answer="{answer}")
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


@pytest.fixture
def world(tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    cache = tmp_path / "runs" / "cache" / "ansible-modules"

    def run(answer: str) -> str:
        (library / "drydock_cache_probe.py").write_text(MODULE.replace("{answer}", answer))
        env = dict(ansible_env(), DRYDOCK_MODULE_CACHE=str(cache), ANSIBLE_LIBRARY=str(library),
                   ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"))
        proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", "-e",
                               json.dumps({"ansible_python_interpreter": sys.executable}), str(tmp_path / "play.yml")],
                              cwd=project_root(), env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    return run, cache


def test_a_module_is_built_once_and_built_again_when_its_code_changes(world):
    run, cache = world
    assert "answer=one" in run("one")
    (first,) = cache.iterdir()
    payload = first / PAYLOAD
    built = payload.stat().st_ino
    assert oct(cache.stat().st_mode & 0o777) == oct(first.stat().st_mode & 0o777) == "0o700"
    assert "answer=one" in run("one")
    assert payload.stat().st_ino == built  # taken from the cache, not written again
    assert "answer=two" in run("two")  # never the payload built from the old code
    assert len(list(cache.iterdir())) == 2


def test_a_key_nobody_used_for_a_day_goes_and_the_one_in_use_stays(world):
    run, cache = world
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
    """Its payloads run on the hosts as root: a folder another user could write to is refused,
    and the run builds its modules as Ansible always does."""
    run, cache = world
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    output = run("one")
    assert "answer=one" in output
    assert "drydock_module_cache: building modules per run" in output and "is not a 0700 folder" in output
    assert list(cache.iterdir()) == []
