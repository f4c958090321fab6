#!/usr/bin/env bash
# Point the `flwr` CLI at a TLS SuperLink: the operator's, on the coordinator (127.0.0.1:9091, the loopback
# port of deploy/start-superlink.sh) or at the local end of an SSH tunnel to it.
#   deploy/connect.sh NAME HOST:PORT CA_CERT
# Adds a [superlink.NAME] connection to $FLWR_HOME/config.toml (default ~/.flwr/config.toml); then
# `flwr run . NAME`, `flwr ls NAME` and `flwr supernode register KEY NAME` use it.
source "$(dirname "$0")/common.sh"
name="${1:?usage: deploy/connect.sh NAME HOST:PORT CA_CERT}"; addr="${2:?HOST:PORT}"; ca="${3:?CA_CERT}"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "connection name '$name' must match [A-Za-z0-9_-]+"
[ -f "$ca" ] || die "CA certificate '$ca' not found; copy ca.crt from the coordinator (deploy/make-certs.sh)"
ca_abs="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
home="${FLWR_HOME:-$HOME/.flwr}"
cfg="$home/config.toml"
mkdir -p "$home"
if [ -f "$cfg" ]; then
  "$ALIGNFL_BIN/python" -c 'import sys, tomllib; sys.exit(sys.argv[2] in tomllib.load(open(sys.argv[1], "rb")).get("superlink", {}))' \
    "$cfg" "$name" || die "connection '$name' already exists in $cfg; edit it there or pick another name"
else
  printf '[superlink]\ndefault = "%s"\n' "$name" > "$cfg"
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$addr" "$ca_abs" >> "$cfg"
echo "flwr connection '$name' -> $addr (TLS, CA $ca_abs) in $cfg"
