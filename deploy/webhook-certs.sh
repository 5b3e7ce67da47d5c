#!/usr/bin/env bash
# Create the injection webhook's serving certificate and wire it up:
#   1. a private CA and a server certificate for weir-cp.weir-system.svc (openssl),
#   2. the Secret weir-system/weir-cp-webhook-tls (tls.crt, tls.key) weir-cp mounts,
#   3. caBundle of both webhook entries in MutatingWebhookConfiguration weir-sidecar-injector.
# Re-run to rotate (then restart weir-cp: it reads the files at start). With cert-manager,
# use a Certificate for the Secret and its `cert-manager.io/inject-ca-from` annotation instead.
set -euo pipefail
NS=${NS:-weir-system}
SVC=${SVC:-weir-cp}
DAYS=${DAYS:-365}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$DAYS" \
  -subj "/CN=weir-sidecar-injector-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=$SVC.$NS.svc" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
  "$SVC" "$SVC" "$NS" "$SVC" "$NS" "$SVC" "$NS" > "$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$DAYS" -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null
kubectl -n "$NS" create secret tls weir-cp-webhook-tls --cert="$dir/tls.crt" --key="$dir/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 -w0 < "$dir/ca.crt")
kubectl patch mutatingwebhookconfiguration weir-sidecar-injector --type=json -p "[
  {\"op\": \"replace\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca\"},
  {\"op\": \"replace\", \"path\": \"/webhooks/1/clientConfig/caBundle\", \"value\": \"$ca\"}]"
echo "webhook certificate for $SVC.$NS.svc installed; restart weir-cp to load it:"
echo "  kubectl -n $NS rollout restart statefulset/weir-cp"
