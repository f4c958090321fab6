#!/usr/bin/env bash
# Make a private CA and a SuperLink TLS certificate signed by it (on the coordinator).
#   deploy/make-certs.sh OUT_DIR [HOST ...]
# The certificate is valid for 127.0.0.1, localhost and every HOST given (IP address or DNS name:
# whatever the silos put in --superlink). Copy OUT_DIR/ca.crt (public) to every silo and to every
# machine that runs `flwr`; ca.key and server.key never leave the coordinator.
# Never replaces a key or the CA: an existing CA (ca.crt + ca.key) signs a new server certificate once
# server.pem and server.key have been moved away (new hosts, renewal); anything else already there is refused.
set -euo pipefail
usage="usage: deploy/make-certs.sh OUT_DIR [HOST ...]"
out="${1:?$usage}"; shift
die() { echo "error: $*" >&2; exit 1; }
umask 077
mkdir -p "$out"; chmod 700 "$out"
for k in ca.key server.key; do [ -f "$out/$k" ] && chmod 600 "$out/$k"; done
for f in server.key server.pem; do
  [ -e "$out/$f" ] && die "$out/$f exists and is never overwritten; move $out/server.pem and $out/server.key away to issue a new server certificate from the same CA"
done
if [ -e "$out/ca.crt" ] || [ -e "$out/ca.key" ]; then
  [ -f "$out/ca.crt" ] && [ -f "$out/ca.key" ] || die "$out holds only half a CA (ca.crt and ca.key go together); restore the missing file, or move both away to make a new CA (every silo then needs the new ca.crt)"
  new_ca=0
else
  new_ca=1
fi
san="IP:127.0.0.1,DNS:localhost"
for h in "$@"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
done
days="${CERT_DAYS:-365}"
if [ "$new_ca" = 1 ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -days "$days" -nodes -keyout "$out/ca.key" -out "$out/ca.crt" \
    -subj "/CN=alignfl federation CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
  -subj "/CN=alignfl superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -out "$out/server.pem" -days "$days" -sha256 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
[ "$new_ca" = 1 ] && ca_note="new CA" || ca_note="existing CA kept"
echo "CA: $out/ca.crt ($ca_note)  server certificate: $out/server.pem (SAN $san)  keys: $out/ca.key $out/server.key"
