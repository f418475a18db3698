"""What ./inv runs: Invoke's own program, with its parser's complaints said as drydock says an
error (one line, what was wrong and where to look), and ./inv as the name in its usage lines.

Invoke answers a missing argument or an unknown word with a bare "'pull' did not receive
required positional arguments: 'env'" or "No idea what 'prod' is!". The wording is Invoke's
(pinned in requirements.lock); tests/unit/test_cli.py runs each case through ./inv, so a new
Invoke that words them otherwise fails there rather than in front of an operator.
"""
from __future__ import annotations

import contextlib
import re
import sys
import tomllib
from pathlib import Path

import invoke
from invoke.exceptions import ParseError

MISSING = re.compile(r"'[^']+' did not receive required positional arguments: .*")
UNKNOWN = re.compile(r"No idea what '(?P<word>.*)' is!")
NO_VALUE = re.compile(r"Flag <Argument: (?P<name>\w+)\b.*> needed value and was not given one!")


def plain(error: ParseError) -> str:
    """Invoke's parse error as one drydock line, naming the help that answers it."""
    message = str(error)
    task = error.context.name if error.context is not None else None
    if MISSING.fullmatch(message) and task:
        missing = " ".join(argument.name.upper() for argument in error.context.missing_positional_args)
        usage = " ".join(argument.name.upper() for argument in error.context.positional_args)
        return f"drydock: error: {task} needs {missing}: ./inv {task} {usage} (./inv --help {task} says what it takes)"
    if found := NO_VALUE.fullmatch(message):
        flag = "--" + found["name"].replace("_", "-")
        return f"drydock: error: {flag} needs a value (./inv --help{' ' + task if task else ''})"
    if found := UNKNOWN.fullmatch(message):
        word = found["word"]
        if task:
            return (f"drydock: error: {word!r} is neither an option of {task} nor a task"
                    f" (./inv --help {task} lists its options, ./inv --list the tasks)")
        if word.startswith("-"):
            return f"drydock: error: no option {word!r} (./inv --help lists them)"
        return f"drydock: error: no task {word!r} (./inv --list names them)"
    return f"drydock: error: {message}" + (f" (./inv --help {task})" if task else "")


@contextlib.contextmanager
def plain_parse_errors():
    try:
        yield
    except ParseError as error:
        raise ParseError(plain(error), error.context) from None


class Program(invoke.Program):
    """Invoke's program; it prints a ParseError's text and exits 1, so only the text changes."""

    def parse_core(self, argv):
        with plain_parse_errors():
            super().parse_core(argv)

    def parse_tasks(self):
        with plain_parse_errors():
            super().parse_tasks()

    def parse_cleanup(self):
        with plain_parse_errors():
            super().parse_cleanup()


def command(root: Path) -> list[str]:
    """How ./inv runs a checkout's tasks, for the tests and the bench to run them the same way.
    This file is run by its path, with -P: neither the working folder nor drydock/ goes on
    sys.path (drydock/paths.py must not stand in for a module called paths); Invoke puts the
    checkout there itself when it loads tasks.py."""
    return [sys.executable, "-P", str(root / "drydock" / "cli.py"), "--search-root", str(root)]


def version() -> str:
    """pyproject.toml's version, and Invoke's: what `./inv --version` says."""
    with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as pyproject:
        return f"{tomllib.load(pyproject)['project']['version']} (Invoke {invoke.__version__})"


program = Program(name="drydock", version=version(), binary="./inv", binary_names=["inv"])

if __name__ == "__main__":
    program.run()
