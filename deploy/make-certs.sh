#!/usr/bin/env bash
# Make a private CA and a SuperLink TLS certificate signed by it (run once, on the coordinator).
#   deploy/make-certs.sh OUT_DIR [HOST ...]
# The certificate is valid for 127.0.0.1, localhost and every HOST given (IP address or DNS name:
# whatever the silos put in --superlink). Copy OUT_DIR/ca.crt (public) to every silo and to every
# machine that runs `flwr`; ca.key and server.key never leave the coordinator.
set -euo pipefail
out="${1:?usage: deploy/make-certs.sh OUT_DIR [HOST ...]}"; shift
mkdir -p "$out"
umask 077
san="IP:127.0.0.1,DNS:localhost"
for h in "$@"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
done
days="${CERT_DAYS:-365}"
openssl req -x509 -newkey rsa:3072 -sha256 -days "$days" -nodes -keyout "$out/ca.key" -out "$out/ca.crt" \
  -subj "/CN=alignfl federation CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
  -subj "/CN=alignfl superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -out "$out/server.pem" -days "$days" -sha256 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "CA: $out/ca.crt  server certificate: $out/server.pem (SAN $san)  keys: $out/ca.key $out/server.key"
