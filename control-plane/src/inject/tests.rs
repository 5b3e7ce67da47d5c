//! The injector against real AdmissionReview JSON (control-plane/tests/fixtures/admission/):
//! each patch is applied with the `json-patch` crate and the resulting pod is checked; the
//! example application's injected pod is diffed against deploy/golden/injected-app.yaml
//! (`WEIR_UPDATE_GOLDEN=1` rewrites it).

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Vec<u8> {
    let p = root().join("tests/fixtures/admission").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const SETTINGS: &str = "
tls: {cert_file: /tls/tls.crt, key_file: /tls/tls.key}
proxy_image: weir/weir:test
xds_address: weir-cp.weir-system.svc:18000
";

fn injector_with(yaml: &str) -> Injector {
    let s: InjectSettings = serde_yaml::from_str(yaml).expect("settings");
    Injector::new(s).expect("valid settings")
}

fn injector() -> Injector {
    injector_with(SETTINGS)
}

/// Run a review; returns the response and, when patched, the patched pod.
fn run(inj: &Injector, body: &[u8], policy: NamespacePolicy) -> (Value, Option<Value>, Value) {
    let out = inj.handle(body, policy).expect("a review");
    let resp: Value = serde_json::from_slice(&out).expect("json response");
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(resp["response"]["allowed"], true, "{resp}");
    let review: Value = serde_json::from_slice(body).expect("fixture json");
    assert_eq!(
        resp["response"]["uid"], review["request"]["uid"],
        "uid echoed"
    );
    let pod = review["request"]["object"].clone();
    let patched = resp["response"]["patch"].as_str().map(|b64| {
        assert_eq!(resp["response"]["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        let ops: Value = serde_json::from_slice(&raw).expect("patch json");
        let patch: json_patch::Patch = serde_json::from_value(ops.clone()).expect("RFC 6902");
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        (doc, ops)
    });
    match patched {
        Some((doc, ops)) => (resp, Some(doc), ops),
        None => {
            assert!(resp["response"].get("patchType").is_none());
            (resp, None, Value::Null)
        }
    }
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["spec"][list]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{list} {name} in {pod}"))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

fn flag(args: &[String], f: &str) -> Option<String> {
    args.iter()
        .position(|a| a == f)
        .and_then(|i| args.get(i + 1).cloned())
}

#[test]
fn opt_in_pod_gets_init_sidecar_and_bootstrap() {
    let inj = injector();
    let (resp, pod, ops) = run(&inj, &fixture("opt-in.json"), NamespacePolicy::PodOptIn);
    let pod = pod.expect("patched");
    assert!(resp["response"].get("warnings").is_none(), "{resp}");

    // JSON Pointer escaping for annotation keys; existing annotations are kept.
    let paths: Vec<&str> = ops
        .as_array()
        .expect("ops")
        .iter()
        .map(|o| o["path"].as_str().expect("path"))
        .collect();
    assert_eq!(
        paths,
        [
            "/metadata/annotations/sidecar.weir.io~1status",
            "/metadata/annotations/sidecar.weir.io~1bootstrap",
            "/spec/initContainers",
            "/spec/containers/-",
            "/spec/volumes/-",
        ]
    );
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(
        ann["kubectl.kubernetes.io/restartedAt"],
        "2026-11-28T10:00:00Z"
    );
    let status: Value =
        serde_json::from_str(ann[STATUS_ANNOTATION].as_str().expect("status")).expect("json");
    assert_eq!(status["containers"], json!(["weir-proxy"]));
    assert_eq!(ann[BOOTSTRAP_ANNOTATION].as_str(), Some(inj.bootstrap()));

    // No initContainers before: created with weir-init alone.
    assert_eq!(names(&pod["spec"]["initContainers"]), ["weir-init"]);
    let init = container(&pod, "initContainers", "weir-init");
    let a = args(init);
    assert_eq!(flag(&a, "--proxy-uid").as_deref(), Some("1337"));
    assert_eq!(
        flag(&a, "--exclude-inbound-ports").as_deref(),
        Some("15021,15090,9102,8081")
    );
    assert_eq!(
        flag(&a, "--exclude-outbound-ports").as_deref(),
        Some("5432")
    );
    assert_eq!(
        flag(&a, "--exclude-outbound-cidrs").as_deref(),
        Some("169.254.169.254/32,fd00::/8")
    );
    assert_eq!(
        init["image"], "weir/weir:test",
        "init_image defaults to proxy_image"
    );
    let caps = &init["securityContext"]["capabilities"];
    assert_eq!(caps["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(caps["drop"], json!(["ALL"]));

    // The app container stays first; the sidecar is appended.
    assert_eq!(names(&pod["spec"]["containers"]), ["cart", "weir-proxy"]);
    let proxy = container(&pod, "containers", "weir-proxy");
    let a = args(proxy);
    assert_eq!(flag(&a, "-c").as_deref(), Some("/etc/weir/bootstrap.yaml"));
    assert_eq!(
        flag(&a, "--service-node").as_deref(),
        Some("$(POD_NAME).$(POD_NAMESPACE)")
    );
    assert_eq!(flag(&a, "--service-cluster").as_deref(), Some("cart"));
    let overlay: Value =
        serde_json::from_str(&flag(&a, "--config-yaml").expect("overlay")).expect("json");
    assert_eq!(
        overlay["node"]["metadata"],
        json!({"NAMESPACE": "$(POD_NAMESPACE)", "SERVICE_ACCOUNT": "$(SERVICE_ACCOUNT)", "POD_NAME": "$(POD_NAME)"})
    );
    let env: Vec<(&str, &str)> = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ("POD_IP", "status.podIP"),
        ]
    );
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], HEALTH_PORT);

    // The service-account volume stays; the bootstrap volume projects the annotation.
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        ["kube-api-access-7xk2p", "weir-bootstrap"]
    );
    let v = &pod["spec"]["volumes"][1]["downwardAPI"]["items"][0];
    assert_eq!(
        v["fieldRef"]["fieldPath"],
        "metadata.annotations['sidecar.weir.io/bootstrap']"
    );
    assert_eq!(inj.metrics.injected(), 1);
}

#[test]
fn opt_out_wins() {
    let inj = injector();
    for policy in [NamespacePolicy::PodOptIn, NamespacePolicy::Enabled] {
        let (resp, pod, _) = run(&inj, &fixture("opt-out.json"), policy);
        assert!(pod.is_none(), "{resp}");
    }
    assert_eq!(inj.metrics.skipped(SkipReason::OptedOut), 2);
    assert_eq!(inj.metrics.injected(), 0);
}

#[test]
fn existing_init_containers_and_volumes_are_appended_to() {
    let inj = injector();
    let (_, pod, ops) = run(
        &inj,
        &fixture("existing-arrays.json"),
        NamespacePolicy::PodOptIn,
    );
    let pod = pod.expect("patched (label opt-in)");
    assert_eq!(
        ops[2]["path"], "/spec/initContainers/-",
        "append, not replace"
    );
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["migrate", "weir-init"],
        "existing init containers run first, before interception"
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        ["kube-api-access-7xk2p", "cache", "weir-bootstrap"]
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let proxy = container(&pod, "containers", "weir-proxy");
    // app.kubernetes.io/name wins over app.
    assert_eq!(
        flag(&args(proxy), "--service-cluster").as_deref(),
        Some("cart-api")
    );
    let init = container(&pod, "initContainers", "weir-init");
    assert_eq!(
        flag(&args(init), "--exclude-inbound-ports").as_deref(),
        Some("15021,15090")
    );
    assert_eq!(flag(&args(init), "--exclude-outbound-ports"), None);
}

#[test]
fn pod_without_arrays_or_annotations_in_an_enabled_namespace() {
    let inj = injector();
    // Through /inject (pod opt-in only) the bare pod is left alone...
    let (_, pod, _) = run(&inj, &fixture("no-arrays.json"), NamespacePolicy::PodOptIn);
    assert!(pod.is_none());
    assert_eq!(inj.metrics.skipped(SkipReason::NotOptedIn), 1);
    // ...through /inject/namespace it is injected, creating every array and the map.
    let (_, pod, ops) = run(&inj, &fixture("no-arrays.json"), NamespacePolicy::Enabled);
    let pod = pod.expect("patched");
    let ops = ops.as_array().expect("ops");
    assert_eq!(ops[0]["op"], "add");
    assert_eq!(ops[0]["path"], "/metadata/annotations");
    assert!(
        ops.iter()
            .any(|o| o["path"] == "/spec/volumes" && o["value"].is_array())
    );
    assert_eq!(names(&pod["spec"]["initContainers"]), ["weir-init"]);
    assert_eq!(names(&pod["spec"]["volumes"]), ["weir-bootstrap"]);
    assert_eq!(names(&pod["spec"]["containers"]), ["cart", "weir-proxy"]);
    // No app label: the node cluster is the namespace (from the request; the pod has none).
    let proxy = container(&pod, "containers", "weir-proxy");
    assert_eq!(
        flag(&args(proxy), "--service-cluster").as_deref(),
        Some("batch")
    );
}

#[test]
fn host_network_pods_are_skipped_with_a_warning() {
    let inj = injector();
    let (resp, pod, _) = run(
        &inj,
        &fixture("host-network.json"),
        NamespacePolicy::Enabled,
    );
    assert!(pod.is_none());
    let w = resp["response"]["warnings"][0].as_str().expect("warning");
    assert!(w.contains("hostNetwork"), "{w}");
    assert_eq!(inj.metrics.skipped(SkipReason::HostNetwork), 1);
}

#[test]
fn already_injected_pods_are_left_alone() {
    let inj = injector();
    let (_, pod, _) = run(
        &inj,
        &fixture("already-injected.json"),
        NamespacePolicy::Enabled,
    );
    assert!(pod.is_none());
    // A pod patched once is recognised when sent again (e.g. a reinvocation).
    let (_, patched, _) = run(&inj, &fixture("opt-in.json"), NamespacePolicy::PodOptIn);
    let mut again: Value = serde_json::from_slice(&fixture("opt-in.json")).expect("json");
    again["request"]["object"] = patched.expect("patched");
    let body = serde_json::to_vec(&again).expect("json");
    let (_, pod, _) = run(&inj, &body, NamespacePolicy::PodOptIn);
    assert!(pod.is_none());
    assert_eq!(inj.metrics.skipped(SkipReason::AlreadyInjected), 2);
}

#[test]
fn malformed_requests_are_errors_not_answers() {
    let inj = injector();
    for (body, want) in [
        (b"{not json".to_vec(), "not an AdmissionReview"),
        (b"{}".to_vec(), "apiVersion"),
        (fixture("wrong-version.json"), "admission.k8s.io/v1beta1"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"ConversionReview"}"#.to_vec(),
            "ConversionReview",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "no request uid",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"version":"v1"},"operation":"CREATE"}}"#.to_vec(),
            "request.kind",
        ),
    ] {
        let e = inj
            .handle(&body, NamespacePolicy::PodOptIn)
            .expect_err("400");
        assert!(e.to_string().contains(want), "{e} vs {want}");
    }
    assert_eq!(inj.metrics.bad_requests(), 6);
}

#[test]
fn invalid_traffic_annotations_admit_without_sidecar_and_warn() {
    let inj = injector();
    for (key, value, want) in [
        (EXCLUDE_INBOUND_PORTS, "http", "\"http\" is not a port"),
        (EXCLUDE_OUTBOUND_PORTS, "80,0", "\"0\" is not a port"),
        (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "not a CIDR"),
        (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0", "not a CIDR"),
    ] {
        let mut r: Value = serde_json::from_slice(&fixture("opt-in.json")).expect("json");
        r["request"]["object"]["metadata"]["annotations"][key] = json!(value);
        let (resp, pod, _) = run(
            &inj,
            &serde_json::to_vec(&r).expect("json"),
            NamespacePolicy::PodOptIn,
        );
        assert!(pod.is_none());
        let w = resp["response"]["warnings"][0].as_str().expect("warning");
        assert!(w.contains(key) && w.contains(want), "{w}");
    }
    assert_eq!(inj.metrics.failures(), 4);
}

#[test]
fn other_objects_and_operations_pass_through() {
    let inj = injector();
    let mut r: Value = serde_json::from_slice(&fixture("opt-in.json")).expect("json");
    r["request"]["operation"] = json!("UPDATE");
    let (_, pod, _) = run(
        &inj,
        &serde_json::to_vec(&r).expect("json"),
        NamespacePolicy::Enabled,
    );
    assert!(pod.is_none());
    let mut r: Value = serde_json::from_slice(&fixture("opt-in.json")).expect("json");
    r["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (_, pod, _) = run(
        &inj,
        &serde_json::to_vec(&r).expect("json"),
        NamespacePolicy::Enabled,
    );
    assert!(pod.is_none());
    assert_eq!(inj.metrics.skipped(SkipReason::NotAPodCreate), 2);
}

#[test]
fn unknown_opt_in_values_warn_and_count_as_unset() {
    let inj = injector();
    let mut r: Value = serde_json::from_slice(&fixture("no-arrays.json")).expect("json");
    r["request"]["object"]["metadata"]["labels"] = json!({"weir.io/inject": "yes"});
    let (resp, pod, _) = run(
        &inj,
        &serde_json::to_vec(&r).expect("json"),
        NamespacePolicy::PodOptIn,
    );
    assert!(pod.is_none());
    assert!(
        resp["response"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("\"yes\" ignored"))
    );
}

#[test]
fn json_pointer_escaping() {
    assert_eq!(
        escape_pointer("sidecar.weir.io/status"),
        "sidecar.weir.io~1status"
    );
    assert_eq!(escape_pointer("a~b/c"), "a~0b~1c");
}

#[test]
fn settings_are_checked() {
    for (extra, want) in [
        ("xds_address: nohost\n", "xds_address"),
        ("xds_address: 'h:0'\n", "xds_address"),
        ("image_pull_policy: Sometimes\n", "image_pull_policy"),
        ("proxy_uid: 0\n", "proxy_uid"),
        ("proxy_resources: {requests: {cpu: 1}}\n", "proxy_resources"),
        (
            "proxy_resources: {request: {cpu: '1'}}\n",
            "proxy_resources",
        ),
    ] {
        let yaml = format!(
            "{}{extra}",
            SETTINGS.replace(
                "xds_address: weir-cp.weir-system.svc:18000\n",
                if extra.starts_with("xds_address") {
                    ""
                } else {
                    "xds_address: weir-cp.weir-system.svc:18000\n"
                }
            )
        );
        let s: InjectSettings = serde_yaml::from_str(&yaml).expect("parses");
        let e = Injector::new(s).expect_err(extra);
        assert!(e.to_string().contains(want), "{e}");
    }
    let e =
        crate::settings::Settings::parse("inject: {proxy_image: x}\n", "f").expect_err("missing");
    assert!(e.to_string().contains("inject"), "{e}");
}

/// Substitute the `$(VAR)`s Kubernetes expands, as the kubelet would.
fn expand(s: &str) -> String {
    s.replace("$(POD_NAME)", "cart-6d8f7b9c4-x2x7q")
        .replace("$(POD_NAMESPACE)", "shop")
        .replace("$(SERVICE_ACCOUNT)", "cart")
        .replace("$(WEIR_XDS_TOKEN)", "s3cret")
}

/// The injected sidecar's command line is a valid weir configuration with the node identity
/// weir-cp's CA reads.
fn check_weir_accepts(inj: &Injector, token: bool) -> weir_proxy::config::Snapshot {
    let (_, pod, _) = run(inj, &fixture("opt-in.json"), NamespacePolicy::PodOptIn);
    let pod = pod.expect("patched");
    let a = args(container(&pod, "containers", "weir-proxy"));
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bootstrap.yaml");
    let mut bootstrap = pod["metadata"]["annotations"][BOOTSTRAP_ANNOTATION]
        .as_str()
        .expect("bootstrap")
        .to_string();
    if bootstrap.contains(XDS_CA_DIR) {
        // The ConfigMap volume, as the kubelet would mount it: a real CA certificate.
        let ca = rcgen::generate_simple_self_signed(vec!["weir-cp-ca".to_string()]).expect("CA");
        let ca_dir = dir.path().join("xds-ca");
        std::fs::create_dir_all(&ca_dir).expect("mkdir");
        std::fs::write(ca_dir.join("ca.crt"), ca.cert.pem()).expect("write CA");
        bootstrap = bootstrap.replace(XDS_CA_DIR, &ca_dir.to_string_lossy());
    }
    std::fs::write(&path, bootstrap).expect("write");
    let opts = weir_proxy::cli::Options {
        config_path: Some(path),
        config_yaml: flag(&a, "--config-yaml").map(|s| expand(&s)),
        service_node: flag(&a, "--service-node").map(|s| expand(&s)),
        service_cluster: flag(&a, "--service-cluster"),
        ..Default::default()
    };
    let snap = weir_proxy::config::load(&opts).unwrap_or_else(|e| panic!("weir refuses: {e}"));
    assert_eq!(snap.node.id, "cart-6d8f7b9c4-x2x7q.shop");
    assert_eq!(snap.node.cluster, "cart");
    // What weir-cp's CA will issue for this node.
    assert_eq!(
        crate::ca::claimed_identity(
            "cluster.local",
            snap.bootstrap
                .node
                .as_ref()
                .and_then(|n| n.metadata.as_ref())
        )
        .as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
    assert_eq!(
        snap.admin_address,
        Some("127.0.0.1:15000".parse().expect("addr"))
    );
    let listeners: Vec<&str> = snap.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(listeners, ["weir-health", "weir-prometheus"]);
    assert_eq!(
        snap.xds.ads.as_ref().map(|a| a.initial_metadata.is_empty()),
        Some(!token)
    );
    snap
}

#[test]
fn xds_tls_mounts_the_ca_and_verifies_weir_cp() {
    let inj = injector_with(&format!(
        "{SETTINGS}xds_token_secret: {{name: weir-xds-token, key: token}}\n\
         xds_tls: {{ca_config_map: {{name: weir-cp-ca, key: root.pem}}}}\n"
    ));
    let (_, pod, _) = run(&inj, &fixture("opt-in.json"), NamespacePolicy::PodOptIn);
    let pod = pod.expect("patched");
    let proxy = container(&pod, "containers", "weir-proxy");
    assert_eq!(
        proxy["volumeMounts"],
        json!([
            {"name": "weir-bootstrap", "mountPath": "/etc/weir", "readOnly": true},
            {"name": "weir-xds-ca", "mountPath": "/etc/weir-xds-ca", "readOnly": true},
        ])
    );
    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    let ca = volumes
        .iter()
        .find(|v| v["name"] == "weir-xds-ca")
        .expect("CA volume");
    assert_eq!(
        ca["configMap"],
        json!({"name": "weir-cp-ca", "items": [{"key": "root.pem", "path": "ca.crt"}]})
    );
    let status: Value = serde_json::from_str(
        pod["metadata"]["annotations"][STATUS_ANNOTATION]
            .as_str()
            .expect("status"),
    )
    .expect("status json");
    assert_eq!(status["volumes"], json!(["weir-bootstrap", "weir-xds-ca"]));
    // Onto existing volumes: both appended, the pod's own kept first.
    let (_, pod, _) = run(
        &inj,
        &fixture("existing-arrays.json"),
        NamespacePolicy::PodOptIn,
    );
    assert_eq!(
        names(&pod.expect("patched")["spec"]["volumes"]),
        [
            "kube-api-access-7xk2p",
            "cache",
            "weir-bootstrap",
            "weir-xds-ca"
        ]
    );

    // weir accepts it, and the weir-cp cluster verifies weir-cp's name over TLS with h2.
    let snap = check_weir_accepts(&inj, true);
    let cp = snap
        .clusters
        .iter()
        .find(|c| c.name == "weir-cp")
        .expect("weir-cp cluster");
    let tls = cp.tls.as_ref().expect("ADS over TLS");
    assert_eq!(tls.sni, "weir-cp.weir-system.svc");
    let text = inj.bootstrap();
    assert!(text.contains("alpn_protocols: [h2]"), "{text}");
    assert!(
        text.contains("{san_type: DNS, matcher: {exact: \"weir-cp.weir-system.svc\"}}"),
        "{text}"
    );

    // Without xds_tls: plain text, no CA volume.
    let plain = check_weir_accepts(&injector(), false);
    let cp = plain
        .clusters
        .iter()
        .find(|c| c.name == "weir-cp")
        .expect("cluster");
    assert!(cp.tls.is_none());

    // An explicit SNI; a SNI that is not a DNS name is refused at startup.
    let inj = injector_with(&format!(
        "{SETTINGS}xds_tls: {{ca_config_map: {{name: c, key: k}}, sni: xds.mesh.example}}\n"
    ));
    assert!(inj.bootstrap().contains("sni: \"xds.mesh.example\""));
    for bad in ["sni: 10.0.0.1", "sni: \"\"", "sni: \"a b\""] {
        let s: InjectSettings = serde_yaml::from_str(&format!(
            "{SETTINGS}xds_tls: {{ca_config_map: {{name: c, key: k}}, {bad}}}\n"
        ))
        .expect("parses");
        let e = s.validate().expect_err(bad);
        assert!(e.to_string().contains("inject.xds_tls.sni"), "{e}");
    }
    let s: InjectSettings = serde_yaml::from_str(&format!(
        "{SETTINGS}xds_tls: {{ca_config_map: {{name: \"\", key: k}}}}\n"
    ))
    .expect("parses");
    let e = s.validate().expect_err("empty name");
    assert!(e.to_string().contains("xds_tls.ca_config_map"), "{e}");
}

#[test]
fn rendered_bootstrap_is_valid_weir_config() {
    check_weir_accepts(&injector(), false);
}

#[test]
fn token_secret_moves_ads_credentials_to_args() {
    let inj = injector_with(&format!(
        "{SETTINGS}xds_token_secret: {{name: weir-xds-token, key: token}}\n"
    ));
    assert!(!inj.bootstrap().contains("grpc_services: ["));
    let (_, pod, _) = run(&inj, &fixture("opt-in.json"), NamespacePolicy::PodOptIn);
    let pod = pod.expect("patched");
    let proxy = container(&pod, "containers", "weir-proxy");
    let secret = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "WEIR_XDS_TOKEN")
        .expect("token env");
    assert_eq!(
        secret["valueFrom"]["secretKeyRef"],
        json!({"name": "weir-xds-token", "key": "token"})
    );
    assert!(!pod.to_string().contains("s3cret"));
    check_weir_accepts(&inj, true);
}

#[test]
fn metrics_render() {
    let inj = injector();
    let _ = run(&inj, &fixture("opt-in.json"), NamespacePolicy::PodOptIn);
    let mut out = String::new();
    inj.metrics.render(&mut out);
    for want in [
        "weir_cp_inject_requests_total 1",
        "weir_cp_inject_injected_total 1",
        "weir_cp_inject_skipped_total{reason=\"opted_out\"} 0",
        "weir_cp_inject_failures_total 0",
        "weir_cp_inject_bad_requests_total 0",
        "weir_cp_inject_duration_seconds_count 1",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
}

/// The example application's pod (deploy/example-app/app.yaml) injected with the settings of
/// deploy/weir-cp/configmap.yaml, against deploy/golden/injected-app.yaml.
#[test]
fn golden_injected_example_app() {
    let deploy = root().join("../deploy");
    let cm: Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy.join("weir-cp/configmap.yaml")).expect("configmap"),
    )
    .expect("yaml");
    let settings = crate::settings::Settings::parse(
        cm["data"]["weir-cp.yaml"].as_str().expect("weir-cp.yaml"),
        "configmap",
    )
    .expect("settings");
    crate::ratelimit::RequestLimiter::new(&settings.limits).expect("valid limits");
    let inj = Injector::new(settings.inject.expect("inject block")).expect("valid");
    let app = std::fs::read_to_string(deploy.join("example-app/app.yaml")).expect("app");
    let mut deployment = None;
    for doc in serde_yaml::Deserializer::from_str(&app) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("yaml doc");
        if v["kind"] == "Deployment" {
            deployment = Some(v);
        }
    }
    let d = deployment.expect("a Deployment");
    let ns = d["metadata"]["namespace"].clone();
    let mut meta = d["spec"]["template"]["metadata"].clone();
    // As a ReplicaSet creates it; the name the API server generates is filled in so the
    // golden file is a complete Pod for the schema check.
    let base = format!(
        "{}-7c9d8f6b5-",
        d["metadata"]["name"].as_str().expect("name")
    );
    meta["name"] = json!(format!("{base}x2x7q"));
    meta["generateName"] = json!(base);
    meta["namespace"] = ns.clone();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": d["spec"]["template"]["spec"]});
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns,
            "operation": "CREATE",
            "object": pod,
        }
    });
    let (_, injected, _) = run(
        &inj,
        &serde_json::to_vec(&review).expect("json"),
        NamespacePolicy::Enabled,
    );
    let injected = injected.expect("the example app is injected");
    let rendered = format!(
        "# The example application's pod (deploy/example-app/app.yaml) as weir-cp's injector\n\
         # returns it with deploy/weir-cp/configmap.yaml. Generated by the test\n\
         # inject::tests::golden_injected_example_app; WEIR_UPDATE_GOLDEN=1 rewrites it.\n{}",
        serde_yaml::to_string(&injected).expect("yaml")
    );
    let golden = deploy.join("golden/injected-app.yaml");
    if std::env::var_os("WEIR_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &rendered).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    if want != rendered {
        let diff: Vec<String> = want
            .lines()
            .zip(rendered.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(i, (a, b))| format!("line {}:\n- {a}\n+ {b}", i + 1))
            .collect();
        panic!(
            "{} differs from the rendered injection ({} vs {} lines); first differences:\n{}\n\
             rerun with WEIR_UPDATE_GOLDEN=1 if the change is intended",
            golden.display(),
            want.lines().count(),
            rendered.lines().count(),
            diff.join("\n")
        );
    }
}
