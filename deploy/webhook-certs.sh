#!/usr/bin/env bash
# Create weir-cp's serving certificate and wire it up:
#   1. a private CA and a server certificate for weir-cp.weir-system.svc (openssl; also
#      localhost / 127.0.0.1, for the CLI through `kubectl port-forward`),
#   2. the Secret weir-system/weir-cp-webhook-tls (tls.crt, tls.key) weir-cp mounts: it serves
#      the webhook and (auth.tls) the gRPC and HTTP APIs,
#   3. caBundle of both webhook entries in MutatingWebhookConfiguration weir-sidecar-injector,
#   4. the CA as ConfigMap weir-cp-ca (key ca.crt) in weir-system and in every namespace of
#      APP_NAMESPACES (default: shop) that exists: injected sidecars verify weir-cp with it.
# Re-run to rotate (then restart weir-cp: it reads the files at start; and restart the
# sidecars, which read the CA at start). With cert-manager, use a Certificate for the Secret
# and its `cert-manager.io/inject-ca-from` annotation instead.
set -euo pipefail
NS=${NS:-weir-system}
SVC=${SVC:-weir-cp}
DAYS=${DAYS:-365}
APP_NAMESPACES=${APP_NAMESPACES:-shop}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$DAYS" \
  -subj "/CN=weir-sidecar-injector-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=$SVC.$NS.svc" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' \
  "$SVC" "$SVC" "$NS" "$SVC" "$NS" "$SVC" "$NS" > "$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$DAYS" -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null
kubectl -n "$NS" create secret tls weir-cp-webhook-tls --cert="$dir/tls.crt" --key="$dir/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 -w0 < "$dir/ca.crt")
kubectl patch mutatingwebhookconfiguration weir-sidecar-injector --type=json -p "[
  {\"op\": \"replace\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca\"},
  {\"op\": \"replace\", \"path\": \"/webhooks/1/clientConfig/caBundle\", \"value\": \"$ca\"}]"
for ns in "$NS" $APP_NAMESPACES; do
  if kubectl get namespace "$ns" >/dev/null 2>&1; then
    kubectl -n "$ns" create configmap weir-cp-ca --from-file=ca.crt="$dir/ca.crt" \
      --dry-run=client -o yaml | kubectl apply -f -
  else
    echo "namespace $ns does not exist yet: copy weir-system/weir-cp-ca into it when you create it"
  fi
done
echo "certificate for $SVC.$NS.svc installed; restart weir-cp to load it:"
echo "  kubectl -n $NS rollout restart statefulset/weir-cp"
