#!/usr/bin/env bash
# Start the coordinator's silo-facing port: TLS (the SuperLink's certificate), Flower's Fleet API only,
# forwarded to the SuperLink on 127.0.0.1 (deploy/start-superlink.sh); any other path is refused there.
# Attaches the operator's app signatures (deploy/sign-app.sh) to the FABs SuperNodes fetch.
#   deploy/start-fleet-front.sh CERT_DIR SIGNATURE_DIR [HOST [PORT [SUPERLINK_PORT]]]
# Defaults: 0.0.0.0 9093, SuperLink on 127.0.0.1:9091. Needs no root.
source "$(dirname "$0")/common.sh"
check_flower_pin
usage="usage: deploy/start-fleet-front.sh CERT_DIR SIGNATURE_DIR [HOST [PORT [SUPERLINK_PORT]]]"
certs="${1:?$usage}"; sigs="${2:?$usage}"
mkdir -p "$sigs"
exec "$ALIGNFL_BIN/alignfl" fleet-front --certs "$certs" --signatures "$sigs" --host "${3:-0.0.0.0}" \
  --port "${4:-9093}" --superlink-port "${5:-9091}"
