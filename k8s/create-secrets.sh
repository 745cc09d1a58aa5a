#!/usr/bin/env bash
# The Secrets the plain manifests (k8s/fedssl.yaml) expect, created once; existing ones are
# left alone, so re-running is safe:
#   fedssl-superlink-tls    a CA and the SuperLink's certificate (tls.crt, tls.key, ca.crt)
#                           for the names the hospitals and the run Job dial and 127.0.0.1
#   fedssl-control-token    the bearer token of the SuperLink's control listener (key `token`)
#   fedssl-registry-token   the registry's write token (key `token`)
#   fedssl-<hospital>-auth  each hospital's SuperNode key pair (private-key, public-key; PEM)
#
#   k8s/create-secrets.sh [NAMESPACE]        (default: fedssl)
#
# Needs kubectl (pointing at the cluster) and openssl. The helm chart generates them itself.
set -euo pipefail

NS="${1:-fedssl}"
SUPERLINK="fedssl-superlink"   # the SuperLink's fleet Service of the rendered manifests
CONTROL="fedssl-superlink-control"   # and its control Service
HOSPITALS="hospital-1 hospital-2 hospital-3"   # k8s/values.yaml
DAYS=3650

missing=()
for tool in kubectl openssl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "create-secrets.sh: missing ${missing[*]}; install them first" >&2
  exit 1
fi

exists() { kubectl get secret -n "$NS" "$1" >/dev/null 2>&1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 077

if exists fedssl-superlink-tls; then
  echo "secret/fedssl-superlink-tls exists; keeping it"
else
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$DAYS" -subj "/CN=fedssl-ca" \
    -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
  cat >"$work/san.cnf" <<CNF
subjectAltName = DNS:$SUPERLINK, DNS:$SUPERLINK.$NS, DNS:$SUPERLINK.$NS.svc, DNS:$SUPERLINK.$NS.svc.cluster.local, DNS:$CONTROL, DNS:$CONTROL.$NS, DNS:$CONTROL.$NS.svc, DNS:$CONTROL.$NS.svc.cluster.local, DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth
CNF
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$SUPERLINK.$NS.svc" \
    -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
  openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
    -days "$DAYS" -extfile "$work/san.cnf" -out "$work/tls.crt" 2>/dev/null
  kubectl create secret generic fedssl-superlink-tls -n "$NS" --type=kubernetes.io/tls \
    --from-file=tls.crt="$work/tls.crt" --from-file=tls.key="$work/tls.key" --from-file=ca.crt="$work/ca.crt"
fi

for name in fedssl-control-token fedssl-registry-token; do
  if exists "$name"; then
    echo "secret/$name exists; keeping it"
  else
    openssl rand -hex 32 | tr -d '\n' >"$work/$name"
    kubectl create secret generic "$name" -n "$NS" --from-file=token="$work/$name"
  fi
done

# SuperNode authentication: the run Job registers each public key; a hospital outside the
# cluster makes its own pair and sends only the public key (docs/architecture.md).
for hospital in $HOSPITALS; do
  name="fedssl-$hospital-auth"
  if exists "$name"; then
    echo "secret/$name exists; keeping it"
  else
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/$hospital.key" 2>/dev/null
    openssl ec -in "$work/$hospital.key" -pubout -out "$work/$hospital.pub" 2>/dev/null
    kubectl create secret generic "$name" -n "$NS" \
      --from-file=private-key="$work/$hospital.key" --from-file=public-key="$work/$hospital.pub"
  fi
done

echo "next: kubectl apply -f k8s/fedssl.yaml"
