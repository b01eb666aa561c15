"""The threat-model map (docs/threat-model.toml) and the tests' objective markers agree.

Every test that proves a security objective carries ``@pytest.mark.objective("SO-n")``; the
map lists, per objective, the tests that prove it. This meta-test reads the test files with
`ast` (nothing is imported or run) and fails when the two drift apart:

- a marked test is missing from the map;
- the map lists a test that does not exist, or that is not marked with that objective;
- a marker names something other than SO-1 … SO-9 or ADR-0023, or is not a literal string;
- the map does not cover exactly SO-1 … SO-9 and ADR-0023, or an entry is malformed;
- an objective has no test (whatever its status);
- an objective marked built lists no attacker test (`attacker_tests`: the tests written as an
  attack on a real component, the cheapest abuse that would break the promise), or lists one
  that is not among its `tests`;
- an attacker test is not named in docs/threat-model.md (its "Attacker tests, by objective"
  section states each promise with the test that checks it).

Marker forms understood: decorators on test functions, on test classes (applies to their test
methods) and on methods; module-level and class-level ``pytestmark`` (one mark or a list); and
a marked hypothesis state machine, ``TestX = pytest.mark.objective("SO-n")(Machine.TestCase)``,
whose single test is ``TestX::runTest``. Node ids are ``tests/file.py::test`` or
``tests/file.py::Class::method`` without parametrization suffixes.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = ROOT / "tests"
MAP_PATH = ROOT / "docs" / "threat-model.toml"
MAP_NAME = "docs/threat-model.toml"
# The nine security objectives, plus the direct-message decision (ADR-0023 of the source threat
# model, docs/adr/0014-direct-messages-sealed-per-pair.md here), which makes a promise of its own:
# a third member cannot read a DM and the relay routes it to its two participants only.
OBJECTIVES = (*(f"SO-{n}" for n in range(1, 10)), "ADR-0023")
STATUSES = ("built", "partial", "planned")
HYPOTHESIS_TEST_METHOD = "runTest"


@dataclass
class Scan:
    """What the test sources say: every test node, and which objectives each is marked with."""

    tests: set[str] = field(default_factory=set)
    marked: dict[str, set[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, node_id: str, objectives: list[str]) -> None:
        self.tests.add(node_id)
        if objectives:
            self.marked.setdefault(node_id, set()).update(objectives)


# --- reading markers out of source -----------------------------------------------------------


def _is_objective_mark(func: ast.expr) -> bool:
    """True for ``pytest.mark.objective`` or ``mark.objective`` (the callee, before its args)."""
    if not (isinstance(func, ast.Attribute) and func.attr == "objective"):
        return False
    owner = func.value
    return (isinstance(owner, ast.Attribute) and owner.attr == "mark") or (
        isinstance(owner, ast.Name) and owner.id == "mark"
    )


def _objective_call(expr: ast.expr) -> ast.Call | None:
    if isinstance(expr, ast.Call) and _is_objective_mark(expr.func):
        return expr
    return None


class _Reader:
    def __init__(self, rel: str, scan: Scan) -> None:
        self.rel = rel
        self.scan = scan

    def objective_of(self, call: ast.Call) -> str:
        """The marker's objective; a malformed marker is recorded as a problem."""
        args = call.args
        if len(args) == 1 and not call.keywords:
            arg = args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value not in OBJECTIVES:
                    self.scan.problems.append(
                        f"{self.rel}:{call.lineno}: objective {arg.value!r} is not one of "
                        f"{', '.join(OBJECTIVES)}; fix the marker"
                    )
                return arg.value
        text = ast.unparse(call)
        self.scan.problems.append(
            f"{self.rel}:{call.lineno}: `{text}` must name exactly one objective as a literal "
            'string, e.g. @pytest.mark.objective("SO-3")'
        )
        return text

    def objectives_in(self, exprs: list[ast.expr]) -> list[str]:
        found = []
        for expr in exprs:
            call = _objective_call(expr)
            if call is not None:
                found.append(self.objective_of(call))
        return found

    def pytestmark_in(self, body: list[ast.stmt]) -> list[str]:
        """Objectives from a ``pytestmark = …`` assignment in a module or class body."""
        found: list[str] = []
        for stmt in body:
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            else:
                continue
            if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
                elements = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
                found.extend(self.objectives_in(elements))
        return found

    def module(self, tree: ast.Module) -> None:
        inherited = self.pytestmark_in(tree.body)
        classes = {s.name: s for s in tree.body if isinstance(s, ast.ClassDef)}
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                self.function(stmt, self.rel, inherited)
            elif isinstance(stmt, ast.ClassDef):
                self.klass(stmt, self.rel, inherited)
            elif isinstance(stmt, ast.Assign):
                self.assigned_test_case(stmt, inherited, classes)

    def function(
        self, fn: ast.FunctionDef | ast.AsyncFunctionDef, prefix: str, inherited: list[str]
    ) -> None:
        own = self.objectives_in(fn.decorator_list)
        if fn.name.startswith("test"):
            self.scan.add(f"{prefix}::{fn.name}", inherited + own)
        elif own:
            self.scan.problems.append(
                f"{self.rel}:{fn.lineno}: `{fn.name}` carries an objective marker but pytest "
                "does not collect it (test functions start with `test`)"
            )

    def klass(
        self, cls: ast.ClassDef, prefix: str, inherited: list[str], name: str | None = None
    ) -> None:
        """A class's test methods; `name` is the module attribute pytest collects it under."""
        name = name or cls.name
        own = self.objectives_in(cls.decorator_list) + self.pytestmark_in(cls.body)
        node = f"{prefix}::{name}"
        if not name.startswith("Test"):
            if own or self._has_marked_members(cls):
                self.scan.problems.append(
                    f"{self.rel}:{cls.lineno}: class `{name}` carries objective markers but "
                    "pytest does not collect it (test classes start with `Test`)"
                )
            return
        marks = inherited + own
        methods = [s for s in cls.body if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)]
        for method in methods:
            self.function(method, node, marks)
        for inner in (s for s in cls.body if isinstance(s, ast.ClassDef)):
            self.klass(inner, node, marks)
        if not any(m.name.startswith("test") for m in methods) and any(
            _names_test_case(base) for base in cls.bases
        ):
            # A subclass of a hypothesis state machine's TestCase: its test is inherited.
            self.scan.add(f"{node}::{HYPOTHESIS_TEST_METHOD}", marks)

    def _has_marked_members(self, cls: ast.ClassDef) -> bool:
        return any(
            isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and any(_objective_call(d) for d in s.decorator_list)
            for s in cls.body
        )

    def assigned_test_case(
        self, stmt: ast.Assign, inherited: list[str], classes: dict[str, ast.ClassDef]
    ) -> None:
        """``TestX = Machine.TestCase`` or ``TestX = pytest.mark.objective(…)(Machine.TestCase)``."""
        if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            return
        name = stmt.targets[0].id
        value = stmt.value
        own: list[str] = []
        while isinstance(value, ast.Call) and (mark := _objective_call(value.func)) is not None:
            own.append(self.objective_of(mark))
            if len(value.args) != 1:
                self.scan.problems.append(
                    f"{self.rel}:{stmt.lineno}: cannot tell which tests `{name}` holds; apply the "
                    "marker to exactly one class"
                )
                return
            value = value.args[0]
        node = f"{self.rel}::{name}"
        if _names_test_case(value):
            if name.startswith("Test"):
                self.scan.add(f"{node}::{HYPOTHESIS_TEST_METHOD}", inherited + own)
            elif own:
                self.scan.problems.append(
                    f"{self.rel}:{stmt.lineno}: `{name}` carries an objective marker but pytest "
                    "does not collect it (test classes start with `Test`)"
                )
        elif own and isinstance(value, ast.Name) and value.id in classes:
            # ``TestX = pytest.mark.objective(…)(SomeClass)``: the class's own marks apply too.
            self.klass(classes[value.id], self.rel, inherited + own, name=name)
        elif own:
            self.scan.problems.append(
                f"{self.rel}:{stmt.lineno}: cannot tell which tests `{name}` holds; mark a test "
                "function or class directly"
            )


def _names_test_case(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Attribute) and expr.attr == "TestCase"


def scan_source(source: str, rel: str) -> Scan:
    """Scan one test module's source; `rel` is its path as used in node ids."""
    scan = Scan()
    _Reader(rel, scan).module(ast.parse(source, filename=rel))
    return scan


@functools.cache
def scan_tests() -> Scan:
    """Scan every test module under tests/ (the way pytest names them)."""
    total = Scan()
    files = sorted({*TESTS_DIR.rglob("test_*.py"), *TESTS_DIR.rglob("*_test.py")})
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        one = scan_source(path.read_text(encoding="utf-8"), rel)
        total.tests |= one.tests
        for node, objectives in one.marked.items():
            total.marked.setdefault(node, set()).update(objectives)
        total.problems.extend(one.problems)
    return total


@functools.cache
def load_map() -> dict[str, object]:
    try:
        with MAP_PATH.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise AssertionError(
            f"{MAP_NAME} is missing: it must list every objective SO-1..SO-9 and ADR-0023 with its tests"
        ) from None


def _entry(objective: str) -> dict[str, object]:
    entry = load_map().get(objective)
    assert isinstance(entry, dict), f"{MAP_NAME} has no [{objective}] table"
    return entry


def _listed(objective: str) -> list[str]:
    tests = _entry(objective).get("tests", [])
    assert isinstance(tests, list), f"[{objective}].tests in {MAP_NAME} must be a list"
    return [str(t) for t in tests]


# --- the scanner itself ----------------------------------------------------------------------


def test_scan_finds_marked_tests() -> None:
    # Guards against a scanner that silently matches nothing, which would pass every check.
    scan = scan_tests()
    assert scan.tests, "found no test functions under tests/: is TESTS_DIR right?"
    assert scan.marked, (
        'found no @pytest.mark.objective("SO-n") markers under tests/: the scanner is broken '
        "or every objective lost its tests"
    )


def test_scanner_understands_every_marker_form() -> None:
    source = """
import pytest
from pytest import mark

pytestmark = [pytest.mark.usefixtures("db"), pytest.mark.objective("SO-9")]

@pytest.mark.objective("SO-1")
def test_plain(): ...

@mark.objective("SO-2")
@pytest.mark.parametrize("x", [1, 2])
async def test_async_and_parametrized(x): ...

def test_unmarked(): ...

def helper(): ...

@pytest.mark.objective("SO-3")
class TestGroup:
    pytestmark = pytest.mark.objective("SO-4")

    def test_a(self): ...

    @pytest.mark.objective("SO-5")
    def test_b(self): ...

    def not_a_test(self): ...

class Machine: ...

TestMachine = pytest.mark.objective("SO-6")(Machine.TestCase)
TestOther = Machine.TestCase

@pytest.mark.objective("SO-7")
class TestSubclassed(Machine.TestCase):
    pass
"""
    scan = scan_source(source, "tests/test_x.py")
    base = {"SO-9"}
    assert scan.problems == []
    assert scan.marked == {
        "tests/test_x.py::test_plain": base | {"SO-1"},
        "tests/test_x.py::test_async_and_parametrized": base | {"SO-2"},
        "tests/test_x.py::test_unmarked": base,
        "tests/test_x.py::TestGroup::test_a": base | {"SO-3", "SO-4"},
        "tests/test_x.py::TestGroup::test_b": base | {"SO-3", "SO-4", "SO-5"},
        "tests/test_x.py::TestMachine::runTest": base | {"SO-6"},
        "tests/test_x.py::TestOther::runTest": base,
        "tests/test_x.py::TestSubclassed::runTest": base | {"SO-7"},
    }


def test_scanner_reports_markers_it_cannot_place() -> None:
    source = """
import pytest

@pytest.mark.objective("SO-10")
def test_unknown(): ...

@pytest.mark.objective(OBJ)
def test_not_literal(): ...

@pytest.mark.objective("SO-1")
def helper(): ...

@pytest.mark.objective("SO-1")
class Helpers:
    def test_x(self): ...
"""
    problems = "\n".join(scan_source(source, "tests/test_y.py").problems)
    assert "'SO-10' is not one of" in problems
    assert "literal string" in problems
    assert "`helper`" in problems
    assert "`Helpers`" in problems


# --- markers against the map -----------------------------------------------------------------


def test_markers_name_known_objectives_and_sit_on_collected_tests() -> None:
    problems = scan_tests().problems
    assert not problems, "objective markers that need fixing:\n  " + "\n  ".join(problems)


def test_map_covers_exactly_the_objectives() -> None:
    keys = set(load_map())
    missing = [o for o in OBJECTIVES if o not in keys]
    extra = sorted(keys - set(OBJECTIVES))
    assert not missing, f"add [{'], ['.join(missing)}] to {MAP_NAME}"
    assert not extra, f"{MAP_NAME} has tables {extra}; only {', '.join(OBJECTIVES)} belong there"


def test_map_entries_are_well_formed() -> None:
    problems = []
    for objective in OBJECTIVES:
        entry = _entry(objective)
        title, status, tests = entry.get("title"), entry.get("status"), entry.get("tests")
        if not (isinstance(title, str) and title.strip()):
            problems.append(f'[{objective}] needs a non-empty title = "…"')
        if status not in STATUSES:
            problems.append(f"[{objective}] status = {status!r}; use one of {STATUSES}")
        if not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
            problems.append(f"[{objective}] needs tests = [ … ] (a list of pytest node ids)")
            continue
        for node in tests:
            if not node.startswith("tests/") or "::" not in node or "[" in node:
                problems.append(
                    f"[{objective}] entry {node!r} is not a node id like "
                    "'tests/test_file.py::test_name' (no parametrization suffix)"
                )
        duplicates = sorted({t for t in tests if tests.count(t) > 1})
        if duplicates:
            problems.append(f"[{objective}] lists {duplicates} more than once")
    assert not problems, f"fix {MAP_NAME}:\n  " + "\n  ".join(problems)


def test_every_objective_has_tests() -> None:
    untested = [f"{o} (status {_entry(o).get('status')!r})" for o in OBJECTIVES if not _listed(o)]
    assert not untested, (
        f"these objectives list no tests in {MAP_NAME}: {', '.join(untested)}. Mark the "
        'tests that prove them with @pytest.mark.objective("SO-n") and list them: an '
        "objective without a test is a promise nobody checks."
    )


def test_every_marked_test_is_in_the_map() -> None:
    missing = [
        f'add "{node}" to tests of [{objective}]'
        for node, objectives in sorted(scan_tests().marked.items())
        for objective in sorted(objectives)
        if objective in OBJECTIVES and node not in _listed(objective)
    ]
    assert not missing, f"marked tests missing from {MAP_NAME}:\n  " + "\n  ".join(missing)


def test_every_listed_test_exists_and_carries_its_objective() -> None:
    scan = scan_tests()
    problems = []
    for objective in OBJECTIVES:
        for node in _listed(objective):
            if node not in scan.tests:
                problems.append(
                    f"[{objective}] lists {node}, which does not exist (renamed or deleted?): "
                    f"fix or remove the entry in {MAP_NAME}"
                )
            elif objective not in scan.marked.get(node, set()):
                problems.append(
                    f'[{objective}] lists {node}, which is not marked @pytest.mark.objective("'
                    f'{objective}"): add the marker to the test or remove the entry'
                )
    assert not problems, "\n  ".join(["the map lists tests that do not prove it:", *problems])


def test_every_built_objective_names_its_attacker_tests() -> None:
    problems = []
    for objective in OBJECTIVES:
        entry = _entry(objective)
        attacks = entry.get("attacker_tests", [])
        if not (isinstance(attacks, list) and all(isinstance(t, str) for t in attacks)):
            problems.append(f"[{objective}] attacker_tests must be a list of node ids")
            continue
        if entry.get("status") == "built" and not attacks:
            problems.append(
                f"[{objective}] is marked built but lists no attacker_tests: name the tests that"
                " attack it (a real relay or client, the cheapest abuse), or mark it partial"
            )
        listed = _listed(objective)
        problems.extend(
            f"[{objective}] attacker test {node} is not among its tests"
            for node in attacks
            if node not in listed
        )
    assert not problems, f"fix {MAP_NAME}:\n  " + "\n  ".join(problems)


def test_the_prose_names_every_attacker_test() -> None:
    prose = (ROOT / "docs" / "threat-model.md").read_text()
    missing = [
        f"[{objective}] {node}"
        for objective in OBJECTIVES
        for node in _entry(objective).get("attacker_tests", [])
        if f"`{node}`" not in prose
    ]
    assert not missing, (
        "docs/threat-model.md does not name these attacker tests (add each to 'Attacker tests,"
        " by objective' with the promise it checks):\n  " + "\n  ".join(missing)
    )
