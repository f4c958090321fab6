#!/usr/bin/env bash
# Sign the app that `flwr run APP_DIR` will send (coordinator or the operator's own machine).
#   deploy/sign-app.sh PRIVATE_KEY SIGNATURE_DIR [APP_DIR]
# Builds the FAB exactly as `flwr run` does (Flower's build is deterministic) and writes
# SIGNATURE_DIR/<sha256 of the FAB>.json; deploy/start-fleet-front.sh hands that signature to the
# SuperNodes with the FAB. Sign again after any change to the app's files.
source "$(dirname "$0")/common.sh"
check_flower_pin
usage="usage: deploy/sign-app.sh PRIVATE_KEY SIGNATURE_DIR [APP_DIR]"
key="${1:?$usage}"; sigs="${2:?$usage}"; app="${3:-.}"
[ -f "$key" ] || die "signing key '$key' not found; make it with deploy/make-app-signing-key.sh"
[ -f "$app/pyproject.toml" ] || die "'$app' is not a Flower app (no pyproject.toml); give the app's folder"
exec "$ALIGNFL_BIN/alignfl" app-signing sign "$key" "$sigs" "$app"
