#!/usr/bin/env bash
# Start the coordinator's SuperLink: TLS on one port (Fleet, Control and Runtime APIs), SuperNode
# authentication on, state in a database so registrations survive a restart.
#   deploy/start-superlink.sh CERT_DIR STATE_DIR [HOST [PORT]]
# Environment: SUPERLINK_HEALTH=HOST:PORT to serve gRPC health checks.
source "$(dirname "$0")/common.sh"
check_flower_pin
certs="${1:?usage: deploy/start-superlink.sh CERT_DIR STATE_DIR [HOST [PORT]]}"
state="${2:?usage: deploy/start-superlink.sh CERT_DIR STATE_DIR [HOST [PORT]]}"
host="${3:-0.0.0.0}"; port="${4:-9093}"
for f in ca.crt server.pem server.key; do
  [ -f "$certs/$f" ] || die "$certs/$f missing; make it with deploy/make-certs.sh $certs <public host name>"
done
mkdir -p "$state"
cd "$ALIGNFL_ROOT"
export ALIGNFL_PROJECT_DIR="${ALIGNFL_PROJECT_DIR:-$ALIGNFL_ROOT}"
exec flower-superlink --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" --enable-supernode-auth --host "$host" --port "$port" \
  --database "$state/superlink.db" --disable-runtime-dependency-installation \
  ${SUPERLINK_HEALTH:+--health-server-address "$SUPERLINK_HEALTH"}
