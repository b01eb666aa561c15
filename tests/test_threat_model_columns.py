"""docs/threat-model.md lists every stored column with what it tells a database thief; this
checks the list against the live schema (issue 13, item 10).

The database is migrated with every migration this code knows (the session's template), and
its columns are read from `information_schema`, so a migration that adds, renames or drops a
column fails here until the prose says what the change gives away.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

DOC = Path(__file__).resolve().parent.parent / "docs" / "threat-model.md"
SECTION = "## What a database thief finds, column by column"
ROW = re.compile(r"^\| `([a-z_]+)\.([a-z_]+)` \| (.+) \|$")


def documented_columns() -> dict[tuple[str, str], str]:
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC.name} lost its section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found: dict[tuple[str, str], str] = {}
    for line in body.splitlines():
        match = ROW.match(line)
        if match:
            key = (match.group(1), match.group(2))
            assert key not in found, f"{key[0]}.{key[1]} is listed twice"
            found[key] = match.group(3).strip()
    return found


def test_the_threat_model_lists_every_stored_column_and_no_other(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        live = {
            (str(t), str(c))
            for t, c in conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = 'public'"
            )
        }
    documented = documented_columns()
    assert len(live) > 40  # the query saw the schema (a wrong schema name would see nothing)
    missing = sorted(f"{t}.{c}" for t, c in live - documented.keys())
    stale = sorted(f"{t}.{c}" for t, c in documented.keys() - live)
    assert not missing, (
        f"say in {DOC.name} ({SECTION!r}) what these columns tell a database thief: {missing}"
    )
    assert not stale, f"{DOC.name} lists columns the schema no longer has: {stale}"
    empty = sorted(f"{t}.{c}" for (t, c), what in documented.items() if len(what) < 8)
    assert not empty, f"say what these columns tell a thief: {empty}"
