"""ansible-lint's production profile reports nothing on the playbooks and roles, and
pyflakes nothing on drydock's Python."""
import subprocess

from drydock.paths import project_root
from drydock.playbook import ansible_env
from drydock.testrun import ANSIBLE_LINT, PYFLAKES


def test_ansible_lint_production_profile():
    proc = subprocess.run(ANSIBLE_LINT, cwd=project_root(), env=ansible_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stderr + proc.stdout


def test_pyflakes_finds_no_unused_import_or_undefined_name():
    proc = subprocess.run(PYFLAKES, cwd=project_root(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
