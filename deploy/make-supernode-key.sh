#!/usr/bin/env bash
# Make a silo's SuperNode authentication key pair (ECDSA P-384, OpenSSH format, as Flower expects).
#   deploy/make-supernode-key.sh OUT_DIR SILO_NAME
# Run it on the silo's machine; OUT_DIR/SILO_NAME stays there, OUT_DIR/SILO_NAME.pub goes to the
# coordinator, who registers it (deploy/register-supernode.sh).
set -euo pipefail
out="${1:?usage: deploy/make-supernode-key.sh OUT_DIR SILO_NAME}"
name="${2:?usage: deploy/make-supernode-key.sh OUT_DIR SILO_NAME}"
[[ "$name" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "error: silo name '$name' must match [A-Za-z0-9_.-]{1,64}" >&2; exit 1; }
mkdir -p "$out"
[ -e "$out/$name" ] && { echo "error: $out/$name exists; delete it first to make a new key" >&2; exit 1; }
ssh-keygen -q -t ecdsa -b 384 -N "" -C "alignfl-$name" -f "$out/$name"
echo "private key: $out/$name (keep on this silo)  public key: $out/$name.pub (send to the coordinator)"
