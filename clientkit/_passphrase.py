"""The encryption passphrase floor (see docs/adr/0009-passphrase-floor.md).

The passphrase is the only thing between a stolen sealed keystore and the account's keys, and
an offline attacker can try guesses as fast as their hardware runs Argon2id. So the floor is
load-bearing: at least 15 characters *and* a zxcvbn score of at least 3 ("safely unguessable:
moderate protection from offline slow-hash scenario"), measured with the handle and the login
password as known context so neither can be reused inside it. Length alone lets
"aaaaaaaaaaaaaaa" through; zxcvbn alone lets short random strings through that are easy to lose
— the two together follow NIST SP 800-63B's length-first advice and ASVS's check against
known-weak and context-derived secrets.
"""

from __future__ import annotations

from typing import Final

MIN_CHARS: Final = 15
MIN_SCORE: Final = 3
MAX_CHARS: Final = 1024  # zxcvbn is superlinear; nobody types more


class WeakPassphrase(ValueError):
    """The passphrase is below the floor. The message says why and how to pick a better one."""


def check_passphrase(passphrase: str, *, handle: str = "", login_password: str = "") -> None:
    """Raise `WeakPassphrase` unless `passphrase` meets the floor."""
    how = (
        "Pick four or more unrelated words you can remember (a line from nowhere, not a quote), "
        "at least 15 characters, different from your login password."
    )
    if login_password and passphrase == login_password:
        raise WeakPassphrase(
            f"the encryption passphrase must differ from the login password. {how}"
        )
    if len(passphrase) < MIN_CHARS:
        raise WeakPassphrase(
            f"the passphrase has {len(passphrase)} characters; use at least {MIN_CHARS}. {how}"
        )
    if len(passphrase) > MAX_CHARS:
        raise WeakPassphrase(f"the passphrase is longer than {MAX_CHARS} characters")
    # Imported here: its frequency lists cost ~0.2 s, which only the commands that choose a new
    # passphrase should pay (not `cozy post`, `cozy tail`, … nor `cozy --help`).
    from zxcvbn import zxcvbn

    context = [c for c in (handle, login_password) if c]
    result = zxcvbn(passphrase, user_inputs=context)
    if result["score"] < MIN_SCORE:
        feedback = result.get("feedback") or {}
        reasons = " ".join(
            [feedback.get("warning") or "", *feedback.get("suggestions", [])]
        ).strip()
        raise WeakPassphrase(
            "the passphrase is too easy to guess offline"
            + (f" ({reasons})" if reasons else "")
            + f". {how}"
        )
