"""`cozy release keygen|build|verify` (SO-8): the I/O half of signed releases.

`build` refuses a dirty git tree or a pdm.lock that does not match pyproject.toml, exports the
commit (`git archive HEAD`, so the artifacts are exactly the named commit and nothing else in the
working tree), builds the sdist and wheel there with pdm-backend's PEP 517 hooks in a child
Python (SOURCE_DATE_EPOCH = the commit time, so the bytes are reproducible), and writes a signed
`RELEASE.json` (format and signature: `model/release.py`, ADR-0013).

`verify` trusts only a key given to it (`--pubkey`, `--trust-file`, or the developer's local trust
file that `build` writes beside a development key it generates) — never the id the manifest
names — then checks the signature, expiry, downgrade against the highest version verified before
(the state file), every artifact's size and SHA-256, and the pdm.lock's SHA-256.

Secrets: the signing seed is read from a 0600 file and is never printed, logged or put in an
error message.

Split by role: `_files` (the errors; keys, trust and state files), `_build`, `_verify`; the
command line is here, and the names other code and the tests use are re-exported here.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cozy._release._build import PDM_ENV as PDM_ENV
from cozy._release._build import BuildResult as BuildResult
from cozy._release._build import build_release as build_release
from cozy._release._build import check_lock as check_lock
from cozy._release._build import find_pdm as find_pdm
from cozy._release._files import DEV_TRUST_NAME as DEV_TRUST_NAME
from cozy._release._files import KEY_ENV as KEY_ENV
from cozy._release._files import STATE_NAME as STATE_NAME
from cozy._release._files import BuildFailed as BuildFailed
from cozy._release._files import BuildRefused as BuildRefused
from cozy._release._files import DirtyWorkingTree as DirtyWorkingTree
from cozy._release._files import KeyFileError as KeyFileError
from cozy._release._files import LockFileMissing as LockFileMissing
from cozy._release._files import LockOutOfDate as LockOutOfDate
from cozy._release._files import NotAGitCheckout as NotAGitCheckout
from cozy._release._files import NoTrustedKey as NoTrustedKey
from cozy._release._files import ReleaseSetupError as ReleaseSetupError
from cozy._release._files import StateFileError as StateFileError
from cozy._release._files import TrustFileError as TrustFileError
from cozy._release._files import add_to_trust_file as add_to_trust_file
from cozy._release._files import default_state_path as default_state_path
from cozy._release._files import default_trust_path as default_trust_path
from cozy._release._files import load_trust_file as load_trust_file
from cozy._release._files import parse_public_key as parse_public_key
from cozy._release._files import read_key as read_key
from cozy._release._files import sha256_file as sha256_file
from cozy._release._files import write_new_key as write_new_key
from cozy._release._verify import verify_release as verify_release
from model import release
from model.release import ReleaseError

if TYPE_CHECKING:
    import argparse


# --- CLI ------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Dispatch `cozy release …`. 0 success; 1 refused to build or could not check; 2 the
    release does not verify."""
    try:
        if args.release_action == "keygen":
            return _keygen(args)
        if args.release_action == "build":
            return _build(args)
        return _verify(args)
    except ReleaseSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BuildRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except ReleaseError as exc:
        print(f"REJECTED ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 2


def _keygen(args: argparse.Namespace) -> int:
    public_key = write_new_key(args.out)
    if args.trust_file is not None:
        add_to_trust_file(args.trust_file, public_key, note=f"key {args.out}")
    print(f"wrote a new release signing key to {args.out} (mode 0600; keep it offline)")
    print(f"public key: {public_key.hex()}")
    print(f"key id:     {release.key_id(public_key)}")
    print("publish the public key with your releases; verifiers pin it with --pubkey")
    return 0


def _build(args: argparse.Namespace) -> int:
    result = build_release(
        workdir=Path.cwd(),
        out_dir=args.out,
        manifest_path=args.manifest,
        key_file=args.key,
        valid_days=args.valid_days,
        pdm=args.pdm,
        now=datetime.now(UTC),
        warn=_warn,
    )
    body = result.body
    print(f"built {body.project} {body.version} from commit {body.source_commit}")
    for artifact in body.artifacts:
        print(f"  {artifact.path}  {artifact.size} bytes  sha256 {artifact.sha256}")
    print(f"  pdm.lock sha256 {body.lock_sha256} ({result.lock_note})")
    print(
        f"wrote {os.path.relpath(result.manifest)} signed by {result.key_id}, "
        f"valid until {release.utc_text(body.expires)}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    verified = verify_release(
        manifest_path=args.manifest,
        pubkey=args.pubkey,
        trust_file=args.trust_file,
        lock_path=args.lock,
        state_path=args.state or default_state_path(),
        now=datetime.now(UTC),
        warn=_warn,
    )
    body = verified.body
    print(
        f"OK: {body.project} {body.version} from commit {body.source_commit}, signed by "
        f"{verified.key_id}, valid until {release.utc_text(body.expires)}"
    )
    for artifact in body.artifacts:
        print(f"  {artifact.path}  {artifact.size} bytes  sha256 ok")
    print(f"  {args.lock}  matches the release's pdm.lock")
    return 0
