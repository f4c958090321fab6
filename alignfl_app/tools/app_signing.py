"""The operator's app signatures: an Ed25519 signing key, the trusted-entities file silos install, signed FABs.

Flower 1.42's SuperNode (``flower-supernode --trusted-entities FILE``) runs a FAB only if ``fab.verifications``
holds an Ed25519 signature, by a key named in FILE, of ``create_message_to_sign(sha256(fab), signed_at)``.
Flower itself fills ``verifications`` for Flower Hub apps only (a FAB sent by ``flwr run .`` gets none), so
``app-signing sign`` signs the FAB that ``flwr run APP_DIR`` will send, with Flower's own message format and signing
function, and the fleet front (alignfl_app.tools.fleet_front) attaches the signature when a SuperNode
fetches that FAB. The SuperNode's check is Flower's, unchanged.

    alignfl app-signing key OUT_DIR KEY_NAME      # OUT_DIR/KEY_NAME (private), OUT_DIR/trusted-entities.yaml
    alignfl app-signing sign PRIVATE_KEY SIGNATURE_DIR [APP_DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from base64 import urlsafe_b64encode
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, load_private_key, sign_message

KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TRUSTED_ENTITIES = "trusted-entities.yaml"
# Flower's SuperNode refuses a FAB before checking signatures unless this entry is set ("the SuperLink verifies apps")
VERIFICATION_SUPPORTED = {"valid_license": "Valid"}


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (created if missing, tightened if it exists)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a file that must not exist yet, created with ``mode`` (never a moment more open)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_signing_key(out: Path, name: str) -> tuple[Path, Path]:
    """Make the operator's Ed25519 key ``out/name`` (600) and ``out/trusted-entities.yaml`` naming its public half.

    Refuses to touch an existing key or trusted-entities file: silos trust what is in it.
    """
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"key name '{name}' must match [A-Za-z0-9_.-]{{1,64}}")
    out = private_folder(out)
    key_path, trusted = out / name, out / TRUSTED_ENTITIES
    for path in (key_path, trusted):
        if path.exists():
            if path == key_path:
                key_path.chmod(0o600)
            raise FileExistsError(
                f"{path} exists and is never overwritten; keep using it, or move it away to make a "
                "new key (then every silo needs the new trusted-entities.yaml)"
            )
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    write_new(key_path, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()), 0o600)
    write_new(trusted, f'# Apps signed by this key may run on this SuperNode\n{name}: "{public}"\n'.encode(), 0o644)
    return key_path, trusted


def fab_of(app: Path) -> bytes:
    """The FAB ``flwr run APP`` sends: Flower's own build, which is byte-for-byte deterministic."""
    from flwr.cli.build import build_fab_from_disk  # imports Flower's CLI stack; only signing needs it

    return build_fab_from_disk(app)


def signature_file(signatures: Path, fab: bytes) -> Path:
    return signatures / f"{hashlib.sha256(fab).hexdigest()}.json"


def sign_fab(fab: bytes, private_key: Path, signatures: Path) -> Path:
    """Sign ``fab`` with ``private_key`` (its file name is the key's name in trusted-entities.yaml).

    Writes ``SIGNATURE_DIR/<sha256 of the FAB>.json``, ``{key name: {"signature", "signed_at"}}``: the entries
    of Flower's ``fab.verifications``. Another key's signature of the same FAB is kept.
    """
    try:
        key = load_private_key(private_key)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the Ed25519 signing key {private_key} ({err}); make one with deploy/make-app-signing-key.sh"
        ) from None
    signed_at = int(time.time())
    signature = sign_message(key, create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    signatures.mkdir(parents=True, exist_ok=True)
    path = signature_file(signatures, fab)
    entries = json.loads(path.read_text()) if path.exists() else {}
    entries[private_key.name] = {
        "signature": urlsafe_b64encode(signature).rstrip(b"=").decode(),
        "signed_at": signed_at,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    tmp.replace(path)
    return path


def verifications(fab: bytes, signatures: Path) -> dict[str, str]:
    """``fab.verifications`` for a FAB: its signatures from ``signatures`` (none if unsigned), in Flower's format."""
    path = signature_file(signatures, fab)
    entries = json.loads(path.read_text()) if path.is_file() else {}
    return {**VERIFICATION_SUPPORTED, **{name: json.dumps(entry) for name, entry in entries.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl app-signing", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("key", help="make the operator's signing key and trusted-entities.yaml")
    keygen.add_argument("out", type=Path)
    keygen.add_argument("name")
    sign = commands.add_parser("sign", help="sign the FAB that `flwr run APP_DIR` sends")
    sign.add_argument("private_key", type=Path)
    sign.add_argument("signatures", type=Path)
    sign.add_argument("app", type=Path, nargs="?", default=Path("."))
    args = parser.parse_args(argv)
    try:
        if args.command == "key":
            key, trusted = make_signing_key(args.out, args.name)
            print(
                f"signing key: {key} (keep it with the operator)  trusted entities: {trusted} (install on every silo)"
            )
        else:
            fab = fab_of(args.app.resolve())
            path = sign_fab(fab, args.private_key, args.signatures)
            print(f"signed FAB {hashlib.sha256(fab).hexdigest()[:8]} of {args.app.resolve()}: {path}")
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
