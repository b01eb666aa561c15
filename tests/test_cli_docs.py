"""docs/cli.md documents the `cozy` the code builds, and nothing the code no longer has.

A user looking up a command, a flag or an environment variable should find it on one page. The
parser is walked as `cozy` builds it (`cozy.cli.build_parser`), so a command or flag added
anywhere (clientkit's user commands, the relay's, `cozy dev`, `cozy release`) shows up here at
once; the environment variables are read out of the source with `ast` (nothing is run).

The page's shape this relies on: each command with flags of its own, and each leaf command, has
a heading that is exactly its path in backticks (``### `cozy account signup` ``), or a label and
the path (``## Accounts: `cozy account` ``); its flags appear in that section's text or in the
section of a group above it. Environment variables appear anywhere on the page, in backticks.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from cozy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
# Where the shipped code lives; tests/conftest.py is read too, for COZY_TEST_DATABASE_URL.
PACKAGES = ("clientkit", "cozy", "relay", "fanout", "ledger", "model", "witness")
EXTRA_SOURCES = (ROOT / "tests" / "conftest.py",)
_COZY_VAR = re.compile(r"COZY_[A-Z0-9_]+")
# "### `cozy account signup`", or a group's "## Accounts: `cozy account`".
_HEADING = re.compile(r"^#{1,6}\s+(?:[^`]*:\s+)?`(cozy(?: [a-z][a-z0-9-]*)*)`\s*$")


def _commands(
    parser: argparse.ArgumentParser, path: str = "cozy"
) -> dict[str, tuple[list[str], bool]]:
    """Each command path -> (its long flags, whether it is a leaf), walking every subparser."""
    flags: list[str] = []
    children: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children.update(action.choices)
        elif action.option_strings and action.help is not argparse.SUPPRESS:
            flags += [o for o in action.option_strings if o.startswith("--") and o != "--help"]
    found = {path: (flags, not children)}
    for name, child in children.items():
        found.update(_commands(child, f"{path} {name}"))
    return found


def _sections() -> dict[str, str]:
    """Each ``cozy …`` heading of the page -> the text up to the next heading."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            match = _HEADING.match(line)
            current = match.group(1) if match else None
            if current is not None:
                sections.setdefault(current, "")
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _source_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return files + [p for p in EXTRA_SOURCES if p.exists()]


def _is_environ(node: ast.expr) -> bool:
    """`os.environ`, `environ`, or a mapping the code names `env` (relay/config.py)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ"
    return isinstance(node, ast.Name) and node.id in {"environ", "env"}


def _env_reads(tree: ast.AST) -> set[str]:
    """Names the code reads from the environment.

    Any literal that is a whole `COZY_…` name counts (they are all variable names: constants
    such as `KDF_PROFILE_ENV`, `pick("COZY_…", …)`); other names count when read directly:
    `os.environ.get(N)`, `os.getenv(N)`, `environ[N]`, `N in env`, or the first argument of
    relay/config.py's `pick`.
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _COZY_VAR.fullmatch(node.value):
                names.add(node.value)
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            func = node.func
            if (
                (isinstance(func, ast.Name) and func.id == "pick")
                or (isinstance(func, ast.Attribute) and func.attr == "getenv")
                or (
                    isinstance(func, ast.Attribute)
                    and func.attr in {"get", "setdefault"}
                    and _is_environ(func.value)
                )
            ):
                names.add(first.value)
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                names.add(node.slice.value)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and any(isinstance(op, ast.In) for op in node.ops)
            and any(_is_environ(c) for c in node.comparators)
        ):
            names.add(str(node.left.value))
    return names


def _code_env_vars() -> set[str]:
    names: set[str] = set()
    for path in _source_files():
        names |= _env_reads(ast.parse(path.read_text(), filename=str(path)))
    return names


def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(name)}(?![A-Za-z0-9_-])", text) is not None


COMMANDS = _commands(build_parser())


def test_the_walk_sees_the_commands_a_user_runs() -> None:
    # Guards the walker itself: if it stopped descending, every other test would pass vacuously.
    assert "cozy account signup" in COMMANDS
    assert "--relay" in COMMANDS["cozy account signup"][0]
    assert "cozy relay lockouts clear" in COMMANDS
    assert "cozy release verify" in COMMANDS
    assert len([p for p, (_, leaf) in COMMANDS.items() if leaf]) >= 30


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_and_flag_has_its_section(path: str) -> None:
    flags, leaf = COMMANDS[path]
    if not leaf and not flags:
        return  # a group (`cozy account`): its commands carry the documentation
    sections = _sections()
    assert path in sections, f"docs/cli.md has no heading ### `{path}`"
    # A flag every command of a group shares (`cozy relay … --config`) may be documented once,
    # in the group's section.
    words = path.split()
    text = "".join(sections.get(" ".join(words[:n]), "") for n in range(1, len(words) + 1))
    missing = [f for f in flags if not _mentioned(f, text)]
    assert not missing, f"docs/cli.md's section on `{path}` does not mention {missing}"


def test_no_section_documents_a_command_that_does_not_exist() -> None:
    stale = sorted(set(_sections()) - set(COMMANDS))
    assert not stale, f"docs/cli.md documents commands `cozy` does not have: {stale}"


def test_the_env_var_walk_finds_the_reads_it_must() -> None:
    found = _code_env_vars()
    for name in ("COZY_NEW_PASSPHRASE", "COZY_RECOVERY_CODE", "DATABASE_URL", "CF_ACCESS_AUD"):
        assert name in found


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    text = DOC.read_text()
    missing = sorted(n for n in _code_env_vars() if not _mentioned(n, text))
    assert not missing, f"docs/cli.md does not mention the environment variables {missing}"


def test_every_cozy_variable_documented_is_read_by_the_code() -> None:
    stale = sorted(set(_COZY_VAR.findall(DOC.read_text())) - _code_env_vars())
    assert not stale, f"docs/cli.md documents variables nothing reads: {stale}"


def test_every_exit_code_the_cli_returns_is_explained() -> None:
    from clientkit._cli_session import EXIT_FAILED, EXIT_INTEGRITY

    exits = DOC.read_text().split("## Exit codes", 1)[-1]
    for code in (0, EXIT_FAILED, 2, EXIT_INTEGRITY, 130):
        assert re.search(rf"^\| {code} \|", exits, re.MULTILINE), f"exit code {code} unexplained"
