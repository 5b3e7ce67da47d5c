//! Sidecar injection: a Kubernetes mutating admission webhook served by weir-cp
//! (`serve --webhook-address`, settings block `inject:`) that adds weir to pods that opt in.
//!
//! ```text
//! API server --POST /inject (HTTPS, AdmissionReview v1)--> weir-cp
//!   decide():  already injected (sidecar.weir.io/status)  -> skip
//!              spec.hostNetwork                            -> skip (cannot intercept)
//!              label weir.io/inject / annotation
//!              sidecar.weir.io/inject = "false"            -> skip (opt-out wins)
//!              either = "true"                             -> inject
//!              neither: `/inject/namespace`                -> inject (namespace label matched
//!                                                             the webhook's namespaceSelector)
//!                       `/inject`                          -> skip (not opted in)
//!   patch():   RFC 6902 ops, base64, patchType JSONPatch
//!     /metadata/annotations   sidecar.weir.io/status, sidecar.weir.io/bootstrap
//!     /spec/initContainers    weir-init (iptables; NET_ADMIN, NET_RAW; root)
//!     /spec/containers        weir-proxy (uid 1337, read-only root, no capabilities)
//!     /spec/volumes           weir-bootstrap: downwardAPI volume projecting the
//!                             bootstrap annotation to /etc/weir/bootstrap.yaml
//! ```
//!
//! **Bootstrap**: rendered by the webhook into the pod's `sidecar.weir.io/bootstrap`
//! annotation and projected into the sidecar by a `downwardAPI` volume. No per-namespace
//! ConfigMap has to exist, the file is visible with `kubectl get pod -o yaml`, and the volume
//! is read-only (the sidecar runs with a read-only root filesystem). It holds the admin
//! address (127.0.0.1:15000), ADS to weir-cp (`inject.xds_address`, a STRICT_DNS cluster over
//! HTTP/2), a health listener on 15021 forwarding `/ready` to the admin (kubelet's readiness
//! probe; the admin itself stays on loopback) and a Prometheus listener on 15090 forwarding
//! `/stats/prometheus`. The per-pod parts come from the downward API at run time, through
//! Kubernetes' `$(VAR)` expansion of container args: `--service-node
//! $(POD_NAME).$(POD_NAMESPACE)` (a pod created with `generateName` has no name yet at
//! admission) and `--config-yaml` carrying `node.metadata` `NAMESPACE` / `SERVICE_ACCOUNT` /
//! `POD_NAME`, from which weir-cp's CA issues `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`.
//! With `inject.xds_token_secret`, the ADS `grpc_services` entry moves to `--config-yaml`
//! with `authorization: Bearer $(WEIR_XDS_TOKEN)`, the variable coming from that Secret
//! (which must exist in the pod's namespace): the token never appears in the pod spec.
//! With `inject.xds_tls`, the sidecar reaches weir-cp over TLS: the `weir-cp` cluster gets an
//! `UpstreamTlsContext` (SNI and a DNS SAN check for `xds_tls.sni`, default the host of
//! `xds_address`; ALPN h2) trusting the CA in a ConfigMap (`xds_tls.ca_config_map`, which
//! must exist in the pod's namespace, Istio's `istio-ca-root-cert` pattern), mounted
//! read-only at `/etc/weir-xds-ca/ca.crt` by a `weir-xds-ca` volume — so the bearer token
//! and the node's identity claim never cross the network in plain text.
//!
//! **Traffic annotations** (Istio's names under `traffic.sidecar.weir.io/`):
//! `excludeInboundPorts`, `excludeOutboundPorts` (comma-separated ports) and
//! `excludeOutboundIPRanges` (comma-separated CIDRs) become `weir-init` flags; 15021 and
//! 15090 are always excluded inbound. An invalid value is not guessed at: the pod is admitted
//! without a sidecar and a warning says why.
//!
//! **Never blocking**: every well-formed review is answered `allowed: true`; when no patch can
//! be built the reason is a warning. Only a body that is not an `AdmissionReview` v1 gets a
//! 400 (the API server then applies the webhook's `failurePolicy`).
//!
//! Metrics (`/metrics` on the API address): `weir_cp_inject_requests_total`,
//! `weir_cp_inject_injected_total`, `weir_cp_inject_skipped_total{reason}`,
//! `weir_cp_inject_failures_total` (admitted without a sidecar because of an invalid
//! annotation), `weir_cp_inject_bad_requests_total` (400) and
//! `weir_cp_inject_duration_seconds`.

pub mod review;
pub mod server;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::metrics::{Collector, Histogram};
use review::{AdmissionRequest, AdmissionResponse, AdmissionReview, AdmissionReviewResponse};

/// Pod label that opts a pod in (`"true"`) or out (`"false"`); the same label on a namespace
/// is what the webhook configuration's `namespaceSelector` matches.
pub const INJECT_LABEL: &str = "weir.io/inject";
/// Pod annotation that opts a pod in or out.
pub const INJECT_ANNOTATION: &str = "sidecar.weir.io/inject";
/// Set on injected pods (what was added, as JSON); its presence means "already injected".
pub const STATUS_ANNOTATION: &str = "sidecar.weir.io/status";
/// The rendered bootstrap, projected into the sidecar by the downward API.
pub const BOOTSTRAP_ANNOTATION: &str = "sidecar.weir.io/bootstrap";
/// Overrides the node cluster (`--service-cluster`).
pub const CLUSTER_ANNOTATION: &str = "sidecar.weir.io/cluster";
/// Comma-separated inbound ports not redirected to the proxy.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.weir.io/excludeInboundPorts";
/// Comma-separated outbound ports not redirected to the proxy.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.weir.io/excludeOutboundPorts";
/// Comma-separated outbound CIDRs not redirected to the proxy.
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "traffic.sidecar.weir.io/excludeOutboundIPRanges";

/// Name of the sidecar container.
pub const PROXY_CONTAINER: &str = "weir-proxy";
/// Name of the init container.
pub const INIT_CONTAINER: &str = "weir-init";
/// Name of the bootstrap volume.
pub const BOOTSTRAP_VOLUME: &str = "weir-bootstrap";
/// Where the bootstrap volume is mounted in the sidecar.
pub const BOOTSTRAP_DIR: &str = "/etc/weir";
/// Outbound capture port (weir-init's default, Istio's 15001).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound capture port (weir-init's default, Istio's 15006).
pub const INBOUND_PORT: u16 = 15006;
/// weir's admin address inside the pod (loopback only).
pub const ADMIN_PORT: u16 = 15000;
/// Health listener: `/ready` forwarded to the admin (kubelet probes it).
pub const HEALTH_PORT: u16 = 15021;
/// Prometheus listener: `/stats/prometheus` forwarded to the admin.
pub const PROMETHEUS_PORT: u16 = 15090;

/// The `inject:` block of weir-cp's settings.
///
/// ```yaml
/// inject:
///   tls: {cert_file: /etc/weir-cp/webhook/tls.crt, key_file: /etc/weir-cp/webhook/tls.key}
///   proxy_image: weir/weir:0.1.0
///   xds_address: weir-cp.weir-system.svc:18000
///   xds_token_secret: {name: weir-xds-token, key: token}   # optional
///   xds_tls: {ca_config_map: {name: weir-cp-ca, key: ca.crt}}  # optional, sni: host
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectSettings {
    /// The webhook's serving certificate and key (PEM); the API server only calls webhooks
    /// over HTTPS.
    pub tls: WebhookTls,
    /// Image of the sidecar (`weir`).
    pub proxy_image: String,
    /// Image of the init container (`weir-init`); default: `proxy_image` (one image ships
    /// both binaries and iptables).
    #[serde(default)]
    pub init_image: Option<String>,
    /// `imagePullPolicy` of both containers.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// weir-cp's ADS address as pods reach it, `host:port` (a Service DNS name).
    pub xds_address: String,
    /// A Secret (in each application namespace) holding a weir-cp bearer token with
    /// `xds:read` and the workload identities of that namespace.
    #[serde(default)]
    pub xds_token_secret: Option<SecretKeyRef>,
    /// ADS over TLS: the CA that signed weir-cp's serving certificate and the name to check.
    #[serde(default)]
    pub xds_tls: Option<XdsTls>,
    /// The proxy's uid (and gid); weir-init exempts its traffic from redirection.
    #[serde(default = "default_uid")]
    pub proxy_uid: u32,
    /// `--log-level` of the sidecar.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// `--concurrency` of the sidecar (worker threads).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// `--drain-time-s` of the sidecar.
    #[serde(default = "default_drain")]
    pub drain_time_s: u32,
    /// The sidecar's `resources` (Kubernetes `ResourceRequirements`).
    #[serde(default = "default_proxy_resources")]
    pub proxy_resources: Value,
    /// The init container's `resources`.
    #[serde(default = "default_init_resources")]
    pub init_resources: Value,
}

/// `inject.tls`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTls {
    /// PEM certificate chain (its SAN must be the webhook Service's DNS name).
    pub cert_file: std::path::PathBuf,
    /// PEM private key.
    pub key_file: std::path::PathBuf,
}

/// `inject.xds_tls`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsTls {
    /// A ConfigMap (in each application namespace) holding the PEM CA bundle that verifies
    /// weir-cp's xDS serving certificate.
    pub ca_config_map: SecretKeyRef,
    /// SNI sent to weir-cp and the DNS SAN its certificate must carry; default: the host of
    /// `xds_address`.
    #[serde(default)]
    pub sni: Option<String>,
}

/// Where the `weir-xds-ca` volume is mounted in the sidecar (not under the bootstrap's
/// read-only downward-API volume at /etc/weir: a mount point cannot be made inside it).
pub const XDS_CA_DIR: &str = "/etc/weir-xds-ca";
const XDS_CA_VOLUME: &str = "weir-xds-ca";

/// `inject.xds_token_secret` (and `xds_tls.ca_config_map`: the same name/key pair).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key in the Secret.
    pub key: String,
}

fn default_pull_policy() -> String {
    "IfNotPresent".into()
}
fn default_uid() -> u32 {
    1337
}
fn default_log_level() -> String {
    "info".into()
}
fn default_concurrency() -> u32 {
    2
}
fn default_drain() -> u32 {
    45
}
fn default_proxy_resources() -> Value {
    json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}})
}
fn default_init_resources() -> Value {
    json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}})
}

/// Why the `inject:` settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A field has a value that cannot work.
    #[error("inject.{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl InjectSettings {
    /// Check what serde cannot: the address, images, resources, pull policy.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |field, message: String| Err(SettingsError::Invalid { field, message });
        if split_host_port(&self.xds_address).is_none() {
            return bad(
                "xds_address",
                format!("{:?} is not host:port", self.xds_address),
            );
        }
        if self.proxy_image.trim().is_empty() {
            return bad("proxy_image", "empty".into());
        }
        if matches!(&self.init_image, Some(i) if i.trim().is_empty()) {
            return bad("init_image", "empty".into());
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return bad(
                "image_pull_policy",
                format!(
                    "{:?}: use Always, IfNotPresent or Never",
                    self.image_pull_policy
                ),
            );
        }
        if self.proxy_uid == 0 {
            return bad("proxy_uid", "the proxy must not run as root".into());
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be positive".into());
        }
        if let Some(t) = &self.xds_tls {
            if t.ca_config_map.name.trim().is_empty() || t.ca_config_map.key.trim().is_empty() {
                return bad("xds_tls.ca_config_map", "name and key must be set".into());
            }
            let sni = self.xds_sni().unwrap_or_default();
            if sni.is_empty() || sni.parse::<IpAddr>().is_ok() || sni.contains([' ', '"', ':']) {
                return bad(
                    "xds_tls.sni",
                    format!(
                        "{sni:?} is not a DNS name (weir-cp's certificate is checked against it)"
                    ),
                );
            }
        }
        for (field, v) in [
            ("proxy_resources", &self.proxy_resources),
            ("init_resources", &self.init_resources),
        ] {
            let ok = v.as_object().is_some_and(|o| {
                o.iter().all(|(k, v)| {
                    (k == "requests" || k == "limits")
                        && v.as_object()
                            .is_some_and(|q| q.values().all(|x| x.is_string()))
                })
            });
            if !ok {
                return bad(
                    field,
                    "expected {requests: {cpu: ..., memory: ...}, limits: {...}} with string quantities"
                        .into(),
                );
            }
        }
        Ok(())
    }

    fn init_image(&self) -> &str {
        self.init_image.as_deref().unwrap_or(&self.proxy_image)
    }

    /// With `xds_tls`: the name weir-cp's certificate is checked against.
    fn xds_sni(&self) -> Option<String> {
        let t = self.xds_tls.as_ref()?;
        Some(match &t.sni {
            Some(s) => s.trim().to_string(),
            None => split_host_port(&self.xds_address)
                .map(|(h, _)| h)
                .unwrap_or_default(),
        })
    }
}

/// `host:port` (IPv6 literals in brackets).
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ', '[', ']', '"', '\\', '{', '}', ',']) {
        return None;
    }
    Some((host.to_string(), port))
}

/// Why a pod was left alone (the `reason` label of `weir_cp_inject_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a `CREATE` of a core `v1` `Pod`.
    NotAPodCreate,
    /// Neither the pod nor (per the webhook path) its namespace opted in.
    NotOptedIn,
    /// The pod's label or annotation says `"false"`.
    OptedOut,
    /// `spec.hostNetwork`: rules would capture the node's traffic.
    HostNetwork,
    /// The pod already carries the status annotation or a `weir-proxy` container.
    AlreadyInjected,
}

impl SkipReason {
    const ALL: [SkipReason; 5] = [
        SkipReason::NotAPodCreate,
        SkipReason::NotOptedIn,
        SkipReason::OptedOut,
        SkipReason::HostNetwork,
        SkipReason::AlreadyInjected,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotAPodCreate => "not_a_pod_create",
            SkipReason::NotOptedIn => "not_opted_in",
            SkipReason::OptedOut => "opted_out",
            SkipReason::HostNetwork => "host_network",
            SkipReason::AlreadyInjected => "already_injected",
        }
    }
}

/// Why a review could not be answered (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not JSON, or not shaped like an `AdmissionReview`.
    #[error("not an AdmissionReview: {0}")]
    Malformed(String),
    /// Another `apiVersion` / `kind`.
    #[error("unsupported {field} {value:?} (want {API}/{KIND_})", API = review::API_VERSION, KIND_ = review::KIND)]
    Unsupported {
        /// `apiVersion` or `kind`.
        field: &'static str,
        /// What was sent.
        value: String,
    },
    /// No `request`, or no `uid`.
    #[error("the AdmissionReview has no request uid")]
    NoRequest,
}

/// Why a pod that opted in is admitted without a sidecar (a warning to the user).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// An annotation value is invalid.
    #[error("annotation {key}={value:?}: {message}")]
    Annotation {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// The pod object is not shaped like a pod.
    #[error("the pod's {0} is not what a Pod has")]
    Shape(&'static str),
}

/// Counters and a latency histogram; rendered at `/metrics` (see the module docs).
#[derive(Debug, Default)]
pub struct InjectMetrics {
    requests: AtomicU64,
    injected: AtomicU64,
    skipped: [AtomicU64; 5],
    failures: AtomicU64,
    bad_requests: AtomicU64,
    /// Time to answer one review.
    pub duration: Histogram,
}

impl InjectMetrics {
    /// Reviews received (including bad ones).
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }
    /// Pods patched.
    pub fn injected(&self) -> u64 {
        self.injected.load(Relaxed)
    }
    /// Pods skipped for `reason`.
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped[reason as usize].load(Relaxed)
    }
    /// Opted-in pods admitted without a sidecar (invalid annotations).
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }
    /// Bodies refused with 400.
    pub fn bad_requests(&self) -> u64 {
        self.bad_requests.load(Relaxed)
    }
}

impl Collector for InjectMetrics {
    fn render(&self, out: &mut String) {
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {v}");
        };
        counter(
            out,
            "weir_cp_inject_requests_total",
            "Admission reviews received by the sidecar injector.",
            self.requests(),
        );
        counter(
            out,
            "weir_cp_inject_injected_total",
            "Pods the sidecar was injected into.",
            self.injected(),
        );
        let _ = writeln!(
            out,
            "# HELP weir_cp_inject_skipped_total Pods admitted unchanged, by reason."
        );
        let _ = writeln!(out, "# TYPE weir_cp_inject_skipped_total counter");
        for r in SkipReason::ALL {
            let _ = writeln!(
                out,
                "weir_cp_inject_skipped_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.skipped(r)
            );
        }
        counter(
            out,
            "weir_cp_inject_failures_total",
            "Opted-in pods admitted without a sidecar (invalid annotations), with a warning.",
            self.failures(),
        );
        counter(
            out,
            "weir_cp_inject_bad_requests_total",
            "Request bodies that were not an AdmissionReview v1 (answered 400).",
            self.bad_requests(),
        );
        self.duration.render(
            "weir_cp_inject_duration_seconds",
            "Time to answer one admission review.",
            out,
        );
    }
}

/// Where the review came from (the webhook configuration entry's path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespacePolicy {
    /// `/inject`: only pods that opt in themselves.
    PodOptIn,
    /// `/inject/namespace`: the namespace is labelled `weir.io/inject: "true"`, so
    /// every pod not opting out.
    Enabled,
}

/// The injector: settings, the rendered bootstrap, metrics.
#[derive(Debug)]
pub struct Injector {
    settings: InjectSettings,
    bootstrap: String,
    /// Its metrics (add to weir-cp's with `Metrics::add_collector`).
    pub metrics: std::sync::Arc<InjectMetrics>,
}

/// The outcome of one review.
#[derive(Debug)]
pub enum Outcome {
    /// Patched.
    Injected(Vec<Value>),
    /// Left alone.
    Skipped(SkipReason),
    /// Opted in but not patchable.
    Failed(InjectError),
}

impl Injector {
    /// Build from validated settings.
    pub fn new(settings: InjectSettings) -> Result<Self, SettingsError> {
        settings.validate()?;
        let bootstrap = render_bootstrap(&settings);
        Ok(Injector {
            settings,
            bootstrap,
            metrics: Default::default(),
        })
    }

    /// The bootstrap every injected sidecar gets (before `--config-yaml`).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Answer a request body: the response JSON, or why the body is not a review (400).
    pub fn handle(&self, body: &[u8], policy: NamespacePolicy) -> Result<Vec<u8>, ReviewError> {
        let start = std::time::Instant::now();
        self.metrics.requests.fetch_add(1, Relaxed);
        let r = self.review(body, policy);
        match &r {
            Ok(_) => self.metrics.duration.observe(start.elapsed()),
            Err(e) => {
                self.metrics.bad_requests.fetch_add(1, Relaxed);
                tracing::warn!("sidecar injector: bad request: {e}");
            }
        }
        r.map(|resp| serde_json::to_vec(&resp).unwrap_or_default())
    }

    fn review(
        &self,
        body: &[u8],
        policy: NamespacePolicy,
    ) -> Result<AdmissionReviewResponse, ReviewError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let review: AdmissionReview = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| ReviewError::Malformed(format!("{}: {}", e.path(), e.inner())))?;
        if review.api_version != review::API_VERSION {
            return Err(ReviewError::Unsupported {
                field: "apiVersion",
                value: review.api_version,
            });
        }
        if review.kind != review::KIND {
            return Err(ReviewError::Unsupported {
                field: "kind",
                value: review.kind,
            });
        }
        let req = review.request.ok_or(ReviewError::NoRequest)?;
        if req.uid.is_empty() {
            return Err(ReviewError::NoRequest);
        }
        let mut response = AdmissionResponse {
            uid: req.uid.clone(),
            allowed: true,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
        };
        let pod_name = pod_display_name(&req);
        match self.outcome(&req, policy, &mut response.warnings) {
            Outcome::Injected(ops) => {
                self.metrics.injected.fetch_add(1, Relaxed);
                tracing::info!(pod = %pod_name, "sidecar injected");
                let patch = serde_json::to_vec(&ops).unwrap_or_default();
                response.patch_type = Some("JSONPatch");
                response.patch = Some(base64::engine::general_purpose::STANDARD.encode(patch));
            }
            Outcome::Skipped(reason) => {
                self.metrics.skipped[reason as usize].fetch_add(1, Relaxed);
                tracing::debug!(pod = %pod_name, reason = reason.as_str(), "sidecar not injected");
            }
            Outcome::Failed(e) => {
                self.metrics.failures.fetch_add(1, Relaxed);
                tracing::warn!(pod = %pod_name, "sidecar not injected: {e}");
                response
                    .warnings
                    .push(format!("weir sidecar not injected: {e}"));
            }
        }
        Ok(AdmissionReviewResponse::new(response))
    }

    /// Decide and build the patch for one request.
    pub fn outcome(
        &self,
        req: &AdmissionRequest,
        policy: NamespacePolicy,
        warnings: &mut Vec<String>,
    ) -> Outcome {
        let is_pod =
            req.kind.group.is_empty() && req.kind.version == "v1" && req.kind.kind == "Pod";
        let Some(pod) = req
            .object
            .as_ref()
            .filter(|_| is_pod && req.operation == "CREATE")
        else {
            return Outcome::Skipped(SkipReason::NotAPodCreate);
        };
        if let Err(reason) = decide(pod, policy, warnings) {
            return Outcome::Skipped(reason);
        }
        let namespace = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .or(req.namespace.as_deref())
            .unwrap_or("default");
        match self.patch(pod, namespace) {
            Ok(ops) => Outcome::Injected(ops),
            Err(e) => Outcome::Failed(e),
        }
    }

    /// The JSON Patch adding weir to `pod`.
    pub fn patch(&self, pod: &Value, namespace: &str) -> Result<Vec<Value>, InjectError> {
        let s = &self.settings;
        let annotations = pod.pointer("/metadata/annotations");
        let annotation = |k: &str| annotations.and_then(|a| a.get(k)).and_then(Value::as_str);
        // Traffic exclusions, checked before anything is built.
        let mut inbound = vec![HEALTH_PORT, PROMETHEUS_PORT];
        if let Some(v) = annotation(EXCLUDE_INBOUND_PORTS) {
            for p in parse_ports(EXCLUDE_INBOUND_PORTS, v)? {
                if !inbound.contains(&p) {
                    inbound.push(p);
                }
            }
        }
        let outbound = annotation(EXCLUDE_OUTBOUND_PORTS)
            .map(|v| parse_ports(EXCLUDE_OUTBOUND_PORTS, v))
            .transpose()?
            .unwrap_or_default();
        let cidrs = annotation(EXCLUDE_OUTBOUND_CIDRS)
            .map(|v| parse_cidrs(EXCLUDE_OUTBOUND_CIDRS, v))
            .transpose()?
            .unwrap_or_default();
        let spec = pod.get("spec").ok_or(InjectError::Shape("spec"))?;
        if !spec.is_object() {
            return Err(InjectError::Shape("spec"));
        }
        let labels = pod.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let cluster = annotation(CLUSTER_ANNOTATION)
            .or_else(|| label("app.kubernetes.io/name"))
            .or_else(|| label("app"))
            .unwrap_or(namespace);

        let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut init_args = vec![
            "--proxy-uid".to_string(),
            s.proxy_uid.to_string(),
            "--exclude-inbound-ports".into(),
            join(&inbound),
        ];
        if !outbound.is_empty() {
            init_args.push("--exclude-outbound-ports".into());
            init_args.push(join(&outbound));
        }
        if !cidrs.is_empty() {
            init_args.push("--exclude-outbound-cidrs".into());
            init_args.push(cidrs.join(","));
        }
        let init = json!({
            "name": INIT_CONTAINER,
            "image": s.init_image(),
            "imagePullPolicy": s.image_pull_policy,
            "command": ["weir-init"],
            "args": init_args,
            "resources": s.init_resources,
            "securityContext": {
                // iptables needs root and these two capabilities; it writes its lock under
                // /run, so the root filesystem stays writable for this short-lived container.
                "runAsUser": 0,
                "runAsGroup": 0,
                "runAsNonRoot": false,
                "privileged": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": false,
                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            },
        });

        let mut overlay = json!({"node": {"metadata": {
            "NAMESPACE": "$(POD_NAMESPACE)",
            "SERVICE_ACCOUNT": "$(SERVICE_ACCOUNT)",
            "POD_NAME": "$(POD_NAME)",
        }}});
        let mut env = vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("POD_IP", "status.podIP"),
        ];
        if let Some(secret) = &s.xds_token_secret {
            env.push(json!({"name": "WEIR_XDS_TOKEN", "valueFrom": {"secretKeyRef": secret}}));
            overlay["dynamic_resources"] = json!({"ads_config": {"grpc_services": [{
                "envoy_grpc": {"cluster_name": "weir-cp"},
                "initial_metadata": [{"key": "authorization", "value": "Bearer $(WEIR_XDS_TOKEN)"}],
            }]}});
        }
        let mut volumes = vec![json!({
            "name": BOOTSTRAP_VOLUME,
            "downwardAPI": {"items": [{
                "path": "bootstrap.yaml",
                "fieldRef": {"fieldPath": format!("metadata.annotations['{BOOTSTRAP_ANNOTATION}']")},
            }]},
        })];
        let mut mounts =
            vec![json!({"name": BOOTSTRAP_VOLUME, "mountPath": BOOTSTRAP_DIR, "readOnly": true})];
        if let Some(t) = &s.xds_tls {
            volumes.push(json!({
                "name": XDS_CA_VOLUME,
                "configMap": {
                    "name": t.ca_config_map.name,
                    "items": [{"key": t.ca_config_map.key, "path": "ca.crt"}],
                },
            }));
            mounts.push(json!({"name": XDS_CA_VOLUME, "mountPath": XDS_CA_DIR, "readOnly": true}));
        }
        let proxy = json!({
            "name": PROXY_CONTAINER,
            "image": s.proxy_image,
            "imagePullPolicy": s.image_pull_policy,
            "args": [
                "-c", format!("{BOOTSTRAP_DIR}/bootstrap.yaml"),
                "--service-node", "$(POD_NAME).$(POD_NAMESPACE)",
                "--service-cluster", escape_dollars(cluster),
                "--config-yaml", overlay.to_string(),
                "--log-level", s.log_level,
                "--concurrency", s.concurrency.to_string(),
                "--drain-time-s", s.drain_time_s.to_string(),
            ],
            "env": env,
            "ports": [
                {"name": "weir-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                {"name": "http-weir-prom", "containerPort": PROMETHEUS_PORT, "protocol": "TCP"},
            ],
            "readinessProbe": {
                "httpGet": {"path": "/ready", "port": HEALTH_PORT},
                "initialDelaySeconds": 1,
                "periodSeconds": 2,
                "timeoutSeconds": 3,
                "failureThreshold": 30,
            },
            "resources": s.proxy_resources,
            "securityContext": {
                "runAsUser": s.proxy_uid,
                "runAsGroup": s.proxy_uid,
                "runAsNonRoot": true,
                "privileged": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": mounts,
        });
        let status = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "initContainers": [INIT_CONTAINER],
            "containers": [PROXY_CONTAINER],
            "volumes": volumes.iter().map(|v| v["name"].clone()).collect::<Vec<_>>(),
        })
        .to_string();

        let mut ops = Vec::new();
        match annotations {
            Some(a) if a.is_object() => {
                for (k, v) in [
                    (STATUS_ANNOTATION, status),
                    (BOOTSTRAP_ANNOTATION, self.bootstrap.clone()),
                ] {
                    let op = if a.get(k).is_some() { "replace" } else { "add" };
                    ops.push(json!({"op": op, "path": format!("/metadata/annotations/{}", escape_pointer(k)), "value": v}));
                }
            }
            Some(a) if !a.is_null() => return Err(InjectError::Shape("metadata.annotations")),
            _ => {
                if !pod.get("metadata").is_some_and(Value::is_object) {
                    return Err(InjectError::Shape("metadata"));
                }
                ops.push(
                    json!({"op": "add", "path": "/metadata/annotations", "value": {
                        STATUS_ANNOTATION: status,
                        BOOTSTRAP_ANNOTATION: self.bootstrap,
                    }}),
                );
            }
        }
        // Existing init containers run first, with the network as they had it; interception
        // starts with weir-init, last.
        ops.extend(append_ops(spec, "initContainers", vec![init])?);
        ops.extend(append_ops(spec, "containers", vec![proxy])?);
        ops.extend(append_ops(spec, "volumes", volumes)?);
        Ok(ops)
    }
}

fn pod_display_name(req: &AdmissionRequest) -> String {
    let meta = req.object.as_ref().and_then(|o| o.get("metadata"));
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| {
            meta.and_then(|m| m.get("generateName"))
                .and_then(Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    format!("{}/{name}", req.namespace.as_deref().unwrap_or(""))
}

/// Opt-in / opt-out / skip rules (see the module docs).
fn decide(
    pod: &Value,
    policy: NamespacePolicy,
    warnings: &mut Vec<String>,
) -> Result<(), SkipReason> {
    let annotations = pod.pointer("/metadata/annotations");
    if annotations.and_then(|a| a.get(STATUS_ANNOTATION)).is_some()
        || pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
            })
    {
        return Err(SkipReason::AlreadyInjected);
    }
    let mut said = Vec::new();
    for (what, key, map) in [
        ("label", INJECT_LABEL, pod.pointer("/metadata/labels")),
        ("annotation", INJECT_ANNOTATION, annotations),
    ] {
        match map.and_then(|m| m.get(key)).and_then(Value::as_str) {
            None => {}
            Some("true") => said.push(true),
            Some("false") => said.push(false),
            Some(other) => warnings.push(format!(
                "weir: {what} {key}={other:?} ignored (use \"true\" or \"false\")"
            )),
        }
    }
    let wanted = if said.contains(&false) {
        return Err(SkipReason::OptedOut);
    } else {
        said.contains(&true) || policy == NamespacePolicy::Enabled
    };
    if !wanted {
        return Err(SkipReason::NotOptedIn);
    }
    if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
        warnings.push(
            "weir sidecar not injected: hostNetwork pods share the node's network namespace".into(),
        );
        return Err(SkipReason::HostNetwork);
    }
    Ok(())
}

/// `add` to the end of `spec.<field>`, or create the array.
/// Append `values` (at least one) to `/spec/<field>`: one `-` add per value onto an existing
/// array, or one add creating the array.
fn append_ops(
    spec: &Value,
    field: &'static str,
    values: Vec<Value>,
) -> Result<Vec<Value>, InjectError> {
    Ok(match spec.get(field) {
        Some(Value::Array(_)) => values
            .into_iter()
            .map(|value| json!({"op": "add", "path": format!("/spec/{field}/-"), "value": value}))
            .collect(),
        None | Some(Value::Null) => {
            vec![json!({"op": "add", "path": format!("/spec/{field}"), "value": values})]
        }
        Some(_) => return Err(InjectError::Shape(field)),
    })
}

/// RFC 6901: `~` -> `~0`, `/` -> `~1`.
pub fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Kubernetes expands `$(VAR)` in args; `$$` is a literal `$`.
fn escape_dollars(s: &str) -> String {
    s.replace('$', "$$")
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
}

fn parse_ports(key: &'static str, v: &str) -> Result<Vec<u16>, InjectError> {
    let mut out = Vec::new();
    for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n != 0 => {
                if !out.contains(&n) {
                    out.push(n)
                }
            }
            _ => {
                return Err(InjectError::Annotation {
                    key,
                    value: v.to_string(),
                    message: format!("{p:?} is not a port (1-65535)"),
                });
            }
        }
    }
    Ok(out)
}

fn parse_cidrs(key: &'static str, v: &str) -> Result<Vec<String>, InjectError> {
    let mut out = Vec::new();
    for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let ok = c.split_once('/').and_then(|(ip, len)| {
            let ip: IpAddr = ip.parse().ok()?;
            let len: u8 = len.parse().ok()?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            (len <= max).then_some(())
        });
        if ok.is_none() {
            return Err(InjectError::Annotation {
                key,
                value: v.to_string(),
                message: format!("{c:?} is not a CIDR (address/prefix length)"),
            });
        }
        out.push(c.to_string());
    }
    Ok(out)
}

/// The sidecar bootstrap (see the module docs).
pub fn render_bootstrap(s: &InjectSettings) -> String {
    let (host, port) = split_host_port(&s.xds_address).unwrap_or_default();
    let grpc_services = if s.xds_token_secret.is_some() {
        "    # grpc_services (with the bearer token) come from --config-yaml\n".to_string()
    } else {
        "    grpc_services: [{envoy_grpc: {cluster_name: weir-cp}}]\n".to_string()
    };
    let xds_tls = match s.xds_sni() {
        None => String::new(),
        Some(sni) => format!(
            "    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: \"{sni}\"
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: {XDS_CA_DIR}/ca.crt}}
            match_typed_subject_alt_names:
            - {{san_type: DNS, matcher: {{exact: \"{sni}\"}}}}
"
        ),
    };
    let forward = |name: &str, port: u16, prefix: &str| {
        format!(
            "  - name: {name}
    address: {{socket_address: {{address: 0.0.0.0, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: {name}
              domains: [\"*\"]
              routes:
              - match: {{path: {prefix}}}
                route: {{cluster: weir-admin, timeout: 5s}}
"
        )
    };
    format!(
        "# weir sidecar bootstrap, rendered by weir-cp's injector. Node id, cluster and
# metadata come from the command line (--service-node, --service-cluster, --config-yaml).
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN_PORT}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
{grpc_services}  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  listeners:
{health}{prom}  clusters:
  - name: weir-cp
    type: STRICT_DNS
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
{xds_tls}    load_assignment:
      cluster_name: weir-cp
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: \"{host}\", port_value: {port}}}}}}}
  - name: weir-admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: weir-admin
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN_PORT}}}}}}}
",
        health = forward("weir-health", HEALTH_PORT, "/ready"),
        prom = forward("weir-prometheus", PROMETHEUS_PORT, "/stats/prometheus"),
    )
}
