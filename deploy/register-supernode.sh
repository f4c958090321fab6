#!/usr/bin/env bash
# Register a silo's public key with the SuperLink (coordinator side). Only registered keys may connect.
#   deploy/register-supernode.sh PUBLIC_KEY [CONNECTION]
# Prints the silo-nodes entry (silo name = the key's file name, node id = the SuperLink's id for that key) that
# binds the silo's name to this SuperNode in the run config: silo-nodes="hospital-a=<id>,hospital-b=<id>".
source "$(dirname "$0")/common.sh"
check_flower_pin
key="${1:?usage: deploy/register-supernode.sh PUBLIC_KEY [CONNECTION]}"
[ -f "$key" ] || die "public key '$key' not found; the silo makes it with deploy/make-supernode-key.sh"
name="$(basename "$key" .pub)"
out="$(flwr supernode register "$key" ${2:+"$2"} --name "$name" --format json 2>&1)" || true
id="$(printf '%s' "$out" | "$ALIGNFL_BIN/python" -c '
import json, sys
text = sys.stdin.read()
try:
    reply = json.loads(text[text.index("{"):])
except ValueError:
    sys.exit(" ".join(text.split())[-300:] or "no reply from flwr")
if not reply.get("success"):
    sys.exit(reply.get("error-message", "registration failed"))
print(reply["node-id"])
' 2>&1)" || die "registering $key failed: $id"
echo "registered SuperNode $id for silo '$name'; run-config entry: silo-nodes=\"...,$name=$id\""
