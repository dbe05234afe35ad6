#!/bin/sh
# Make a self-signed certificate for the compose demo: ./certs/fullchain.pem, privkey.pem
# for localhost and 127.0.0.1, valid 30 days. For a real deployment use a real certificate
# (e.g. certbot) instead.
set -eu
cd "$(dirname "$0")"
mkdir -p certs
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -days 30 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout certs/privkey.pem -out certs/fullchain.pem 2>/dev/null
# Demo only: the container runs as uid 65532, which must read the key through the bind
# mount. In production make it readable by that uid only (chown 65532, chmod 0600).
chmod 0644 certs/privkey.pem certs/fullchain.pem
openssl x509 -in certs/fullchain.pem -noout -subject -ext subjectAltName -enddate
echo "wrote $(pwd)/certs/fullchain.pem and privkey.pem"
