"""./inv's answers to a command line Invoke cannot parse: one drydock line naming the help
that answers it, exit status 1, and nothing run."""
from __future__ import annotations

import subprocess

import pytest

from drydock.paths import runs_dir
from tests.conftest import ROOT, error_lines


def inv_wrapper(*args: str) -> subprocess.CompletedProcess:
    """The checked-in ./inv itself, as an operator types it."""
    return subprocess.run([str(ROOT / "inv"), *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args, line", [
    (["pull"], "drydock: error: pull needs ENV: ./inv pull ENV (./inv --help pull says what it takes)"),
    (["pull", "--latest"], "drydock: error: pull needs ENV: ./inv pull ENV (./inv --help pull says what it takes)"),
    (["pipeline", "production"],
     "drydock: error: pipeline needs TARGET: ./inv pipeline SOURCE TARGET (./inv --help pipeline says what it takes)"),
    (["snapshot.restore"],
     "drydock: error: snapshot.restore needs NAME: ./inv snapshot.restore NAME (./inv --help snapshot.restore says what it takes)"),
    (["pull", "production", "--bogus"], "drydock: error: '--bogus' is neither an option of pull nor a task"
     " (./inv --help pull lists its options, ./inv --list the tasks)"),
    (["push", "staging", "extra"], "drydock: error: 'extra' is neither an option of push nor a task"
     " (./inv --help push lists its options, ./inv --list the tasks)"),
    (["site", "production", "--port"], "drydock: error: --port needs a value (./inv --help site)"),
    (["site", "production", "example.test", "--site-name"], "drydock: error: --site-name needs a value (./inv --help site)"),
    (["bogus"], "drydock: error: no task 'bogus' (./inv --list names them)"),
    (["--help", "bogus"], "drydock: error: no task 'bogus' (./inv --list names them)"),
    (["--bogus"], "drydock: error: no option '--bogus' (./inv --help lists them)"),
])
def test_a_command_line_invoke_cannot_parse_gets_one_line(args, line):
    before = set(runs_dir().iterdir()) if runs_dir().is_dir() else set()
    proc = inv_wrapper(*args)
    assert proc.returncode == 1 and error_lines(proc) == [line] and proc.stdout == ""
    assert (set(runs_dir().iterdir()) if runs_dir().is_dir() else set()) == before  # no run was started


def test_the_usage_lines_and_version_name_inv():
    usage = inv_wrapper("--help", "pull")
    assert usage.returncode == 0 and usage.stdout.startswith("Usage: ./inv [--core-opts] pull [--options]")
    version = inv_wrapper("--version")
    assert version.returncode == 0 and version.stdout.startswith("drydock 0.1.0 (Invoke ")


def test_the_wrapper_runs_from_another_folder_with_nothing_of_it_on_the_path(tmp_path):
    """A paths.py where the operator stands must not stand in for drydock's, nor for anything
    Invoke imports."""
    (tmp_path / "invoke.py").write_text("raise SystemExit('the working folder was imported')\n")
    (tmp_path / "paths.py").write_text("raise SystemExit('the working folder was imported')\n")
    proc = subprocess.run([str(ROOT / "inv"), "--list"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pull " in proc.stdout and "snapshot.restore" in proc.stdout
