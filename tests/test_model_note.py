"""C2SP signed notes (model/note.py): Go's own test vectors, byte for byte, and strict parsing.

The keys, notes and signatures below are copied verbatim from golang.org/x/mod/sumdb/note's
note_test.go (the reference implementation of the format), so these tests show that Go's
verifier would accept what we sign and that we accept what Go signs.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    MalformedNote,
    MalformedVerifierKey,
    NoteSignatureInvalid,
    NoteSigner,
    NoteUnverified,
    NoteVerifier,
    open_note,
    parse_note,
    sign_note,
)

# --- Go's vectors (golang.org/x/mod/sumdb/note/note_test.go) ------------------------------------
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6"
    "KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WW"
    "d1RvMc+QQ=\n"
)


def peter_signer() -> NoteSigner:
    """Go's private key string is PRIVATE+KEY+<name>+<id>+base64(0x01 || seed)."""
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert raw[0] == ALG_ED25519
    return NoteSigner("PeterNeumann", raw[1:])


def test_go_verifier_key_parses_and_ours_prints_it_back() -> None:
    peter = NoteVerifier.from_vkey(PETER_VKEY)
    assert (peter.name, peter.alg, peter.key_id) == ("PeterNeumann", ALG_ED25519, 0xC74F20A3)
    assert peter.vkey() == PETER_VKEY
    assert peter_signer().verifier == peter
    assert NoteVerifier.from_vkey(ENOCH_VKEY).vkey() == ENOCH_VKEY


def test_every_mangling_of_gos_verifier_key_is_refused() -> None:
    """Go's TestNewVerifier: every proper substring, and every byte bumped by one."""
    b = PETER_VKEY.encode()
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(MalformedVerifierKey):
                    NoteVerifier.from_vkey(b[i:j].decode())
    for i in range(len(b)):
        bumped = bytearray(b)
        bumped[i] += 1
        with pytest.raises(MalformedVerifierKey):
            NoteVerifier.from_vkey(bumped.decode())
    # Go's two adjusted-hash cases: a key of the wrong length, an unknown algorithm.
    for bad in (
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ):
        with pytest.raises(MalformedVerifierKey):
            NoteVerifier.from_vkey(bad)


def test_we_sign_gos_note_byte_for_byte() -> None:
    """Go's TestSign: the same key and text give exactly Go's output."""
    assert sign_note(TEXT, [peter_signer()]).decode() == TEXT + "\n" + PETER_SIG


def test_we_open_gos_notes_as_go_does() -> None:
    """Go's TestOpen: one of two signatures known, both known, none known."""
    peter, enoch = NoteVerifier.from_vkey(PETER_VKEY), NoteVerifier.from_vkey(ENOCH_VKEY)
    msg = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    one = open_note(msg, [peter])
    assert one.text == TEXT
    assert [s.name for s in one.verified] == ["PeterNeumann"]
    assert [(s.name, s.key_id) for s in one.unverified] == [("EnochRoot", 0xAF0CFE78)]
    both = open_note(msg, [peter, enoch])
    assert [s.name for s in both.verified] == ["PeterNeumann", "EnochRoot"]
    assert both.unverified == ()
    with pytest.raises(NoteUnverified):
        open_note(msg, [])
    # Repeated lines count once, known or not (Go's "duplicated verified and unverified").
    again = open_note((TEXT + "\n" + PETER_SIG * 2 + ENOCH_SIG * 2).encode(), [peter])
    assert len(again.verified) == 1
    assert len(again.unverified) == 1


@pytest.mark.objective("SO-4")
def test_gos_invalid_and_malformed_notes_are_refused() -> None:
    peter = NoteVerifier.from_vkey(PETER_VKEY)
    forged = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(NoteSignatureInvalid):
        open_note(forged.encode(), [peter])
    bad_messages = [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT
        + "\n"
        + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * 101,  # too many signatures
    ]
    for msg in bad_messages:
        with pytest.raises(MalformedNote):
            open_note(msg.encode(), [peter])
    with pytest.raises(MalformedNote):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [peter])


# --- Strictness beyond Go's vectors --------------------------------------------------------------


def test_the_text_ends_at_the_last_blank_line() -> None:
    """Notes may hold blank lines; the signatures start after the LAST one."""
    signer = peter_signer()
    text = "para one\n\npara two\n"
    opened = open_note(sign_note(text, [signer]), [signer.verifier])
    assert opened.text == text


@pytest.mark.parametrize(
    "tail",
    [
        "— PeterNeumann  x08g\n",  # two spaces
        "—PeterNeumann x08go/ZJ\n",  # no space after the dash
        "- PeterNeumann x08go/ZJ\n",  # ASCII hyphen
        "— PeterNeumann x08go/Z\n",  # base64 missing its padding
        "— PeterNeumann AAAAAA==\n",  # four bytes: a key ID and no signature
        "— Peter+Neumann AAAAAAA=\n",  # "+" in a name
        "— PeterNeumann AAAAAAB=\n",  # non-canonical base64 (trailing bits set)
        "— PeterNeumann AAAAAAA=\r\n",  # carriage return
        "— PeterNeumann\n",  # no signature at all
    ],
)
def test_malformed_signature_lines_are_refused(tail: str) -> None:
    with pytest.raises(MalformedNote):
        parse_note((TEXT + "\n" + tail).encode())


@pytest.mark.objective("SO-4")
@settings(max_examples=200, deadline=None)
@given(at=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_in_a_signed_note_is_refused(at: int, bit: int) -> None:
    """Every single-bit change of a signed note is either unparseable, unverifiable (our key no
    longer named), or a failed signature: never accepted."""
    signer = peter_signer()
    msg = bytearray(sign_note(TEXT, [signer]))
    msg[at % len(msg)] ^= 1 << bit
    with pytest.raises((MalformedNote, NoteSignatureInvalid, NoteUnverified)):
        open_note(bytes(msg), [signer.verifier])


def test_a_note_signed_by_a_cosigner_key_is_refused_without_the_cosignature_form() -> None:
    """A 0x04 key verifies only cosignature/v1 messages: a plain signature under its name and ID
    is a failed signature, not a pass."""
    cosigner = NoteSigner("witness.example/w1", bytes(32), ALG_COSIGNATURE_V1)
    plain = NoteSigner("witness.example/w1", bytes(32))  # same key, plain Ed25519 over the text
    line = plain.sign(TEXT)
    relabelled = type(line)(cosigner.name, cosigner.verifier.key_id, line.signature)
    with pytest.raises(NoteSignatureInvalid):
        open_note((TEXT + "\n" + relabelled.line()).encode(), [cosigner.verifier])
    ok = cosigner.cosign(TEXT, 1_700_000_000)
    assert open_note((TEXT + "\n" + ok.line()).encode(), [cosigner.verifier]).verified == (ok,)


def test_signers_never_show_their_seed() -> None:
    signer = peter_signer()
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])[1:]
    assert raw.hex() not in repr(signer)
    assert base64.b64encode(raw).decode() not in repr(signer)
    assert PETER_VKEY in repr(signer)


def test_the_same_trusted_key_listed_twice_is_fine() -> None:
    peter = NoteVerifier.from_vkey(PETER_VKEY)
    opened = open_note((TEXT + "\n" + PETER_SIG).encode(), [peter, peter])
    assert len(opened.verified) == 1
