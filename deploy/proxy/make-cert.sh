#!/usr/bin/env bash
# A self-signed certificate for local use of the proxy (deploy/proxy/haproxy.cfg), valid for localhost and
# 127.0.0.1:
#
#   deploy/proxy/make-cert.sh [OUT_DIR]      # default deploy/proxy/certs; writes OUT_DIR/server.pem
#   curl --cacert deploy/proxy/certs/server.crt https://localhost:8443/ping -H "Authorization: Bearer <key>"
#
# server.pem is what HAProxy loads (EE_PROXY_CERT): the certificate followed by its private key. For any
# other use put your own certificate chain and key, in that order, in one PEM file at the same place.
# Clients trust the self-signed one with server.crt (curl --cacert, Python ssl cafile=).
# EE_CERT_DAYS [30], EE_CERT_NAMES [DNS:localhost,IP:127.0.0.1] (subjectAltName) change the defaults.
set -euo pipefail

out="${1:-$(dirname "$0")/certs}"
days="${EE_CERT_DAYS:-30}"
names="${EE_CERT_NAMES:-DNS:localhost,IP:127.0.0.1}"
first="${names%%,*}"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ECDSA P-256: small, fast, accepted by every current client.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
  -subj "/CN=${first#*:}" -addext "subjectAltName=${names}" \
  -keyout "$tmp/server.key" -out "$tmp/server.crt" 2>/dev/null
cat "$tmp/server.crt" "$tmp/server.key" > "$tmp/server.pem"
# Readable by the proxy's container user (a different uid from yours): a throwaway local key only. A real
# key: chmod 0640 and give group 10002 (the proxy image's user) read access instead.
chmod 0644 "$tmp/server.pem" "$tmp/server.crt"
mv "$tmp/server.pem" "$tmp/server.crt" "$out/"
echo "wrote $out/server.pem (certificate + key for the proxy) and $out/server.crt (for clients), ${days} days, ${names}"
