"""ansible-lint's production profile reports nothing on the playbooks and roles."""
import subprocess

from drydock.paths import project_root
from drydock.playbook import ansible_env


def test_ansible_lint_production_profile():
    proc = subprocess.run(["ansible-lint", "playbooks", "roles"], cwd=project_root(), env=ansible_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stderr + proc.stdout
