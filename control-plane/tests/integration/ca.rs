//! The mesh CA end to end: weir-cp serves `ROOTCA` to every proxy and a `default` workload
//! certificate (SPIFFE ID from the node's metadata) only to streams whose credential lists
//! the identity in `workload_identities`; certificates chain to the bundle from
//! `GET /v1/ca/bundle` and `weir-cp ca bundle`, and are re-issued and pushed at half-life.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use weir_control_plane::auth::client::AuthChannel;
use weir_xds_api::pb::envoy::config::core::v3::data_source::Specifier;
use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weir_xds_api::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weir_xds_api::pb::google::protobuf::{Struct, Value, value::Kind};
use weir_xds_api::type_urls::SECRET;

use crate::auth::{channel, creds, metric, start};
use crate::harness::*;

const MESH: &str = "mesh-token-0123456789";
const PLAIN: &str = "plain-token-0123456789";

fn settings() -> String {
    format!(
        "auth:\n  tokens:\n  \
         - {{name: mesh, token: {MESH}, scopes: ['xds:read'], workload_identities: ['spiffe://mesh.test/ns/shop/sa/*']}}\n  \
         - {{name: plain, token: {PLAIN}, scopes: ['xds:read']}}\n\
         ca:\n  trust_domain: mesh.test\n  workload_cert_ttl: 10s\n"
    )
}

fn workload_node(id: &str, ns: &str, sa: &str) -> weir_xds_api::pb::envoy::config::core::v3::Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let mut n = node(id, "sidecars");
    n.metadata = Some(Struct {
        fields: [
            ("NAMESPACE".to_string(), s(ns)),
            ("SERVICE_ACCOUNT".to_string(), s(sa)),
        ]
        .into_iter()
        .collect(),
    });
    n
}

struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SdsStream {
    async fn open(ch: AuthChannel, n: weir_xds_api::pb::envoy::config::core::v3::Node) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let mut r = req(SECRET, &["default", "ROOTCA"], "", "");
        r.node = Some(n);
        tx.send(r).await.expect("queue");
        let rx = AggregatedDiscoveryServiceClient::new(ch)
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        SdsStream { tx, rx }
    }

    async fn recv(&mut self, wait: Duration) -> DiscoveryResponse {
        tokio::time::timeout(wait, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("a message")
    }

    async fn ack(&self, r: &DiscoveryResponse) {
        self.tx
            .send(ack(r, &["default", "ROOTCA"]))
            .await
            .expect("ack");
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<tls::Secret> {
    r.resources
        .iter()
        .map(|a| weir_xds_api::unpack::<tls::Secret>(a).expect("a Secret"))
        .collect()
}

fn inline(ds: &Option<weir_xds_api::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("not inline bytes: {other:?}"),
    }
}

/// (certificate chain PEM, key PEM) of the `default` secret.
fn workload(r: &DiscoveryResponse) -> Option<(String, String)> {
    secrets(r).into_iter().find_map(|s| match s.r#type {
        Some(tls::secret::Type::TlsCertificate(t)) if s.name == "default" => Some((
            String::from_utf8(inline(&t.certificate_chain)).expect("utf8"),
            String::from_utf8(inline(&t.private_key)).expect("utf8"),
        )),
        _ => None,
    })
}

fn root(r: &DiscoveryResponse) -> String {
    secrets(r)
        .into_iter()
        .find_map(|s| match s.r#type {
            Some(tls::secret::Type::ValidationContext(v)) if s.name == "ROOTCA" => {
                Some(String::from_utf8(inline(&v.trusted_ca)).expect("utf8"))
            }
            _ => None,
        })
        .expect("ROOTCA served")
}

fn der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64")
}

/// The leaf's URI SANs and serial, after checking it is signed by `root_pem`.
fn verify(chain_pem: &str, root_pem: &str) -> (Vec<String>, String) {
    let leaf_der = der(chain_pem);
    let root_der = der(root_pem);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("leaf");
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).expect("root");
    leaf.verify_signature(Some(root.public_key()))
        .expect("the workload certificate chains to the bundle");
    let uris = leaf
        .subject_alternative_name()
        .expect("ext")
        .expect("san")
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    (uris, leaf.raw_serial_as_string())
}

#[tokio::test]
async fn workload_certificates_by_sds_with_entitlement_and_rotation() {
    let s = start(&settings()).await;
    let bundle = weir_control_plane::api::Client::new(s.api.to_string())
        .with_token(MESH)
        .expect("token")
        .ca_bundle()
        .await
        .expect("bundle over the API");
    assert!(bundle.contains("BEGIN CERTIFICATE"), "{bundle}");

    // Entitled: ROOTCA and a certificate for spiffe://mesh.test/ns/shop/sa/cart.
    let mut a = SdsStream::open(
        channel(s.xds, &creds(Some(MESH))).await,
        workload_node("cart-1", "shop", "cart"),
    )
    .await;
    let first = a.recv(WAIT).await;
    assert_eq!(first.type_url, SECRET);
    assert_eq!(root(&first), bundle);
    let (chain, key) = workload(&first).expect("default served to an entitled stream");
    assert!(key.contains("PRIVATE KEY"));
    let (uris, serial1) = verify(&chain, &bundle);
    assert_eq!(uris, ["spiffe://mesh.test/ns/shop/sa/cart"]);
    a.ack(&first).await;

    // Not entitled: the credential has no workload_identities, or none matching.
    let mut b = SdsStream::open(
        channel(s.xds, &creds(Some(PLAIN))).await,
        workload_node("cart-2", "shop", "cart"),
    )
    .await;
    let rb = b.recv(WAIT).await;
    assert_eq!(root(&rb), bundle);
    assert!(
        workload(&rb).is_none(),
        "no certificate without entitlement"
    );
    let mut c = SdsStream::open(
        channel(s.xds, &creds(Some(MESH))).await,
        workload_node("admin-1", "admin", "root"),
    )
    .await;
    let rc = c.recv(WAIT).await;
    assert!(workload(&rc).is_none(), "pattern is for ns/shop only");
    let m = s.cp.metrics.render();
    assert!(metric(&m, "weir_cp_ca_denied_total") >= 2, "{m}");
    assert!(
        metric(&m, "weir_cp_ca_certificates_issued_total") >= 1,
        "{m}"
    );

    // Rotation: with a 10 s lifetime the certificate is re-issued after 5 s and pushed on
    // the open stream, with the same identity and a new serial.
    let next = a.recv(Duration::from_secs(30)).await;
    let (chain2, _) = workload(&next).expect("rotated certificate");
    let (uris2, serial2) = verify(&chain2, &bundle);
    assert_eq!(uris2, ["spiffe://mesh.test/ns/shop/sa/cart"]);
    assert_ne!(serial1, serial2, "a new certificate");
    assert_ne!(next.version_info, first.version_info);
}

#[tokio::test]
async fn root_survives_restart_and_cli_prints_it() {
    let dir = temp_dir("ca-root");
    let open = |d: &std::path::Path| {
        let cp = weir_control_plane::ControlPlane::open(Some(d)).expect("open");
        let store = weir_control_plane::ca::RootStore::Embedded(cp.store.clone());
        cp.ca
            .configure(&Default::default(), &store)
            .expect("configure");
        cp.ca.bundle_pem().expect("bundle")
    };
    let first = open(&dir);
    let second = open(&dir);
    assert_eq!(first, second, "the generated root is kept in the store");

    // The CLI against a running server (open mode on loopback).
    let s = start("{}").await;
    let api = s.api.to_string();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || cli(&["ca", "bundle", "--server", &api]))
            .await
            .expect("cli");
    assert!(ok, "{err}");
    assert_eq!(Some(out), s.cp.ca.bundle_pem());
    let _ = std::fs::remove_dir_all(&dir);
}
