#!/usr/bin/env bash
# Make a silo's SuperNode authentication key pair (ECDSA P-384, OpenSSH format, as Flower expects).
#   deploy/make-supernode-key.sh OUT_DIR SILO_NAME
# Run it on the silo's machine; OUT_DIR/SILO_NAME stays there (mode 600, OUT_DIR 700), OUT_DIR/SILO_NAME.pub
# goes to the coordinator, who registers it (deploy/register-supernode.sh). Same format as
# `ssh-keygen -t ecdsa -b 384`, made with the venv's `cryptography` so no OpenSSH client is needed.
# Never overwrites a key.
source "$(dirname "$0")/common.sh"
out="${1:?usage: deploy/make-supernode-key.sh OUT_DIR SILO_NAME}"
name="${2:?usage: deploy/make-supernode-key.sh OUT_DIR SILO_NAME}"
[[ "$name" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "silo name '$name' must match [A-Za-z0-9_.-]{1,64}"
umask 077
mkdir -p "$out"; chmod 700 "$out"
[ -f "$out/$name" ] && chmod 600 "$out/$name"
for f in "$out/$name" "$out/$name.pub"; do
  [ -e "$f" ] && die "$f exists and is never overwritten; keep using it, or move $out/$name and $out/$name.pub away to make a new key (then register the new .pub)"
done
"$ALIGNFL_BIN/python" - "$out/$name" "alignfl-$name" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec

path, comment = sys.argv[1:]
key = ec.generate_private_key(ec.SECP384R1())
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
fd = os.open(path + ".pub", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
with os.fdopen(fd, "wb") as f:
    f.write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + f" {comment}\n".encode())
PY
chmod 644 "$out/$name.pub"
echo "private key: $out/$name (keep on this silo)  public key: $out/$name.pub (send to the coordinator)"
