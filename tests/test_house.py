"""House rules that review alone did not keep, checked over the source tree.

Each concern has one home, and these tests name it: the WebSocket protocol's internals
(relay/_wsraw.py, the relay's own server on wsproto, and clientkit/_transport.py, the client's
one reliance on trio-websocket's private state: the modules that pin the versions they were
read against; nothing else imports wsproto or trio-websocket's private modules), replacing a file (localfs.atomic_write), walking an exception group
(model/excgroups.py), drawing retry jitter (clientkit/_retry.py); and no module outside the
tests grows past MAX_LINES. The layer rules (who may import whom) are import-linter's
contracts in pyproject.toml, run by `make lint`.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import trio_websocket

from clientkit import _transport

REPO = Path(__file__).resolve().parent.parent
PACKAGES = (
    "model",
    "localfs",
    "httpserve",
    "sigworker",
    "ledger",
    "fanout",
    "relay",
    "clientkit",
    "cozy",
)
MAX_LINES = 600
WEBSOCKET_INTERNALS_ALLOWED = {"relay/_wsraw.py", "clientkit/_transport.py"}


def _sources() -> dict[str, ast.Module]:
    return {
        path.relative_to(REPO).as_posix(): ast.parse(path.read_text(encoding="utf-8"))
        for pkg in PACKAGES
        for path in sorted((REPO / pkg).rglob("*.py"))
    }


def _trio_websocket_private_names() -> set[str]:
    """Every underscore name on trio-websocket's public classes, methods and instance state."""
    names: set[str] = set()
    for public in vars(trio_websocket).values():
        if inspect.isclass(public) and public.__module__.startswith("trio_websocket"):
            names |= {n for n in dir(public) if n.startswith("_") and not n.startswith("__")}
            names |= set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(public)))
    return names


def test_trio_websocket_internals_are_touched_only_in_the_pinned_modules() -> None:
    private = _trio_websocket_private_names()
    assert {"_stream", "_stream_lock", "_wsproto", "_close_reason"} <= private
    found: list[str] = []
    for rel, tree in _sources().items():
        if rel in WEBSOCKET_INTERNALS_ALLOWED:
            continue
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if (  # ws._stream, self.ws._stream_lock … (our own self._x is ours)
                isinstance(node, ast.Attribute)
                and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{where} {ast.unparse(node)}")
            if (  # getattr(ws, "_wsproto")
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in private
            ):
                found.append(f"{where} {ast.unparse(node)}")
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for module in modules:  # trio_websocket._impl, or wsproto under it
                if module.startswith(("trio_websocket._", "wsproto")):
                    found.append(f"{where} imports {module}")
    assert found == []


def test_the_client_transport_was_read_against_the_installed_trio_websocket() -> None:
    # On an upgrade: check that `wrap_client_stream` still only calls `start_soon` on its
    # nursery (clientkit/_transport.py `_ShieldedReader`), then extend CHECKED_VERSIONS.
    assert trio_websocket.__version__ in _transport.CHECKED_VERSIONS


def test_files_are_replaced_only_through_atomic_write() -> None:
    calls = {"os.replace", "os.rename", "os.link", "os.fsync", "tempfile.mkstemp"}
    found = [
        f"{rel}:{node.lineno} {ast.unparse(node.func)}"
        for rel, tree in _sources().items()
        if not rel.startswith("localfs/")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in calls
    ]
    assert found == []


def test_no_module_walks_exception_groups_or_draws_jitter_of_its_own() -> None:
    found: list[str] = []
    for rel, tree in _sources().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and len(node.args) == 2
                and "ExceptionGroup" in ast.unparse(node.args[1])
                and rel != "model/excgroups.py"
            ):
                found.append(f"{rel}:{node.lineno} walks an exception group")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
                and rel != "clientkit/_retry.py"
            ):
                found.append(f"{rel}:{node.lineno} draws random.{node.attr}")
    assert found == []


def test_no_module_outside_the_tests_is_over_the_limit() -> None:
    long = {
        path.relative_to(REPO).as_posix(): lines
        for pkg in PACKAGES
        for path in (REPO / pkg).rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
