#!/usr/bin/env bash
# origin-certs.sh DIR: a self-signed CA and two certificates it signs, for the test origins:
#   ca.pem ca.key          the origin CA (what a route's ssl_trusted_certificate points at)
#   origin.pem origin.key  server certificate for origin.test and IP 127.0.0.1
#   client.pem client.key  client certificate (CN=agent-to-origin) for routes with
#                          ssl_certificate / ssl_certificate_key
# Keys are P-256, PKCS#8.
set -euo pipefail
dir=${1:?usage: origin-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=godoxy-agent test origin CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem

leaf() { # name subject extensions
  key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 2 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
leaf origin "/CN=origin.test" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:origin.test,IP:127.0.0.1"
leaf client "/O=GoDoxy test/CN=agent-to-origin" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl
