#!/usr/bin/env bash
# gen-certs.sh DIR: a throwaway CA and a server certificate for localhost/127.0.0.1,
# for the quickstart and the tests. Writes DIR/ca.pem, DIR/cert.pem, DIR/key.pem.
# Idempotent: existing files are kept. Never use these in production.
set -euo pipefail
dir=$1
mkdir -p "$dir"
cd "$dir"
[ -s cert.pem ] && [ -s key.pem ] && [ -s ca.pem ] && exit 0
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.pem -days 30 -subj "/CN=Postern throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout key.pem -out leaf.csr -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out cert.pem -days 30 -extfile leaf.ext 2>/dev/null
rm -f leaf.csr leaf.ext ca.srl
chmod 644 ca.pem cert.pem
