#!/usr/bin/env bash
# Start the coordinator's SuperLink on loopback only: its one TLS port serves Flower's Fleet, Control and
# Runtime APIs, and Flower checks no Control API client, so only the coordinator may reach it. Silos
# reach the Fleet API through deploy/start-fleet-front.sh. SuperNode authentication on, state in a
# database so registrations survive a restart. Run it as an unprivileged user: it needs no root.
#   deploy/start-superlink.sh CERT_DIR STATE_DIR [PORT]      (PORT on 127.0.0.1, default 9091)
# Environment: SUPERLINK_HEALTH=HOST:PORT to serve gRPC health checks.
source "$(dirname "$0")/common.sh"
check_flower_pin
usage="usage: deploy/start-superlink.sh CERT_DIR STATE_DIR [PORT]"
certs="${1:?$usage}"; state="${2:?$usage}"; port="${3:-9091}"
[[ "$port" =~ ^[0-9]+$ ]] || die "port '$port' must be a number; the SuperLink always listens on 127.0.0.1 ($usage)"
for f in ca.crt server.pem server.key; do
  [ -f "$certs/$f" ] || die "$certs/$f missing; make it with deploy/make-certs.sh $certs <public host name>"
done
[ "$(id -u)" != 0 ] || echo "warning: the SuperLink runs as root, and so would every ServerApp; run it as an unprivileged user" >&2
mkdir -p "$state"; chmod 700 "$state"
cd "$ALIGNFL_ROOT"
export ALIGNFL_PROJECT_DIR="${ALIGNFL_PROJECT_DIR:-$ALIGNFL_ROOT}"
exec flower-superlink --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" --enable-supernode-auth --host 127.0.0.1 --port "$port" \
  --database "$state/superlink.db" --disable-runtime-dependency-installation \
  ${SUPERLINK_HEALTH:+--health-server-address "$SUPERLINK_HEALTH"}
