#!/usr/bin/env bash
# Register a silo's public key with the SuperLink (coordinator side). Only registered keys may connect.
#   deploy/register-supernode.sh PUBLIC_KEY [CONNECTION]
source "$(dirname "$0")/common.sh"
check_flower_pin
key="${1:?usage: deploy/register-supernode.sh PUBLIC_KEY [CONNECTION]}"
[ -f "$key" ] || die "public key '$key' not found; the silo makes it with deploy/make-supernode-key.sh"
exec flwr supernode register "$key" ${2:+"$2"} --name "$(basename "$key" .pub)"
