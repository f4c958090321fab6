#!/usr/bin/env bash
# Start one silo's SuperNode: TLS to the coordinator's fleet front, authenticated by the silo's private
# key, running only apps signed by a key in TRUSTED_ENTITIES (deploy/make-app-signing-key.sh), with the
# silo's own node config (checked first: a wrong key or value stops here with one line).
#   deploy/start-supernode.sh SUPERLINK_HOST:PORT CA_CERT PRIVATE_KEY TRUSTED_ENTITIES NODE_CONFIG [CLIENTAPPIO_PORT]
# NODE_CONFIG: 'partition-id=0 silo-name="hospital-a" architecture="conv" data-root="/data" classes="0,1"'
#              or a .toml file with those keys. CLIENTAPPIO_PORT (default 9094) must differ per SuperNode
#              on one machine. Environment: SUPERNODE_HEALTH=HOST:PORT, SUPERNODE_MAX_RETRIES (default 10).
source "$(dirname "$0")/common.sh"
check_flower_pin
usage="usage: deploy/start-supernode.sh SUPERLINK_HOST:PORT CA_CERT PRIVATE_KEY TRUSTED_ENTITIES NODE_CONFIG [CLIENTAPPIO_PORT]"
link="${1:?$usage}"; ca="${2:?$usage}"; key="${3:?$usage}"; trusted="${4:?$usage}"; node_config="${5:?$usage}"
port="${6:-9094}"
[ -f "$ca" ] || die "CA certificate '$ca' not found; copy ca.crt from the coordinator"
[ -f "$key" ] || die "private key '$key' not found; make it with deploy/make-supernode-key.sh"
[ -f "$trusted" ] || die "trusted entities '$trusted' not found; copy trusted-entities.yaml from the operator (deploy/make-app-signing-key.sh)"
cd "$ALIGNFL_ROOT"
"$ALIGNFL_BIN/alignfl" check-node-config "$node_config" >/dev/null
exec flower-supernode --root-certificates "$ca" --superlink "$link" --auth-supernode-private-key "$key" \
  --trusted-entities "$trusted" --node-config "$node_config" --port "$port" \
  --max-retries "${SUPERNODE_MAX_RETRIES:-10}" ${SUPERNODE_HEALTH:+--health-server-address "$SUPERNODE_HEALTH"}
