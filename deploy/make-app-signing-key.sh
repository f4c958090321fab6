#!/usr/bin/env bash
# Make the operator's app signing key (Ed25519) and the trusted-entities file every silo installs.
#   deploy/make-app-signing-key.sh OUT_DIR KEY_NAME
# OUT_DIR/KEY_NAME (mode 600, OUT_DIR 700) signs apps (deploy/sign-app.sh) and stays with the operator;
# OUT_DIR/trusted-entities.yaml goes to every silo (deploy/start-supernode.sh), whose SuperNode then runs
# only apps this key signed. Never overwrites a key or a trusted-entities file.
source "$(dirname "$0")/common.sh"
usage="usage: deploy/make-app-signing-key.sh OUT_DIR KEY_NAME"
out="${1:?$usage}"; name="${2:?$usage}"
umask 077
exec "$ALIGNFL_BIN/alignfl" app-signing key "$out" "$name"
