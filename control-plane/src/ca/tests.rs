use super::*;

fn md(pairs: &[(&str, &str)]) -> weir_xds_api::pb::google::protobuf::Struct {
    use weir_xds_api::pb::google::protobuf::{Value, value::Kind};
    weir_xds_api::pb::google::protobuf::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

fn configured(settings: &CaSettings) -> Arc<CaSource> {
    let store = RootStore::Embedded(Arc::new(crate::storage::Store::in_memory().expect("store")));
    let ca = Arc::new(CaSource::default());
    ca.configure(settings, &store).expect("configure");
    ca
}

fn node(workload: Option<&str>) -> NodeMeta {
    NodeMeta {
        id: "n".into(),
        cluster: "c".into(),
        workload: workload.map(String::from),
    }
}

fn secret(r: &Resource) -> tls::Secret {
    weir_xds_api::unpack(&r.any).expect("secret")
}

fn inline(ds: &Option<DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).expect("utf8"),
        other => panic!("not inline bytes: {other:?}"),
    }
}

#[test]
fn ttl_parsing() {
    assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
    assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86400)));
    assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172800)));
    assert_eq!(parse_ttl("15"), Ok(Duration::from_secs(15)));
    assert!(parse_ttl("h").is_err());
    assert!(parse_ttl("1.5h").is_err());
    assert!(parse_ttl("").is_err());
}

#[test]
fn identities_from_metadata() {
    let td = "mesh.local";
    assert_eq!(
        claimed_identity(
            td,
            Some(&md(&[("NAMESPACE", "shop"), ("SERVICE_ACCOUNT", "cart")]))
        ),
        Some("spiffe://mesh.local/ns/shop/sa/cart".into())
    );
    assert_eq!(
        claimed_identity(
            td,
            Some(&md(&[("namespace", "a"), ("service_account", "b")]))
        ),
        Some("spiffe://mesh.local/ns/a/sa/b".into())
    );
    assert_eq!(claimed_identity(td, Some(&md(&[("NAMESPACE", "a")]))), None);
    assert_eq!(claimed_identity(td, None), None);
    // Path tricks and odd bytes are not identities.
    for bad in ["..", "a/b", "", "a b", "é", "a?x"] {
        assert_eq!(
            claimed_identity(
                td,
                Some(&md(&[("NAMESPACE", bad), ("SERVICE_ACCOUNT", "x")]))
            ),
            None,
            "{bad:?}"
        );
    }
}

#[test]
fn patterns() {
    let td = "mesh.local";
    let id = "spiffe://mesh.local/ns/shop/sa/cart";
    assert!(pattern_allows(id, id, td));
    assert!(pattern_allows("spiffe://mesh.local/ns/shop/sa/*", id, td));
    assert!(pattern_allows("spiffe://mesh.local/ns/*/sa/cart", id, td));
    assert!(pattern_allows("spiffe://mesh.local/ns/*/sa/*", id, td));
    assert!(pattern_allows("spiffe://mesh.local/ns/shop/sa/ca*", id, td));
    assert!(pattern_allows("*", id, td));
    // `*` stays within a segment; other trust domains never match the lone `*`.
    assert!(!pattern_allows("spiffe://mesh.local/ns/*", id, td));
    assert!(!pattern_allows(
        "spiffe://mesh.local/ns/shop/sa/bag",
        id,
        td
    ));
    assert!(!pattern_allows("*", "spiffe://other/ns/a/sa/b", td));
    assert!(!pattern_allows("*", "spiffe://mesh.localx/ns/a/sa/b", td));
    assert!(!pattern_allows("", id, td));
}

#[test]
fn entitlement_follows_credentials() {
    let ca = configured(&CaSettings {
        trust_domain: "mesh.local".into(),
        ..Default::default()
    });
    let m = md(&[("NAMESPACE", "shop"), ("SERVICE_ACCOUNT", "cart")]);
    let id = "spiffe://mesh.local/ns/shop/sa/cart";
    assert_eq!(ca.entitled(Some(&m), true, &[], "n").as_deref(), Some(id));
    assert_eq!(ca.entitled(Some(&m), false, &[], "n"), None);
    assert_eq!(
        ca.entitled(
            Some(&m),
            false,
            &["spiffe://mesh.local/ns/other/sa/*".into()],
            "n"
        ),
        None
    );
    assert_eq!(
        ca.entitled(
            Some(&m),
            false,
            &["spiffe://mesh.local/ns/shop/sa/*".into()],
            "n"
        )
        .as_deref(),
        Some(id)
    );
    assert_eq!(ca.metrics.denied.load(Ordering::Relaxed), 2);
}

#[test]
fn serves_root_to_all_and_certificates_to_entitled_nodes() {
    let ca = configured(&CaSettings {
        trust_domain: "mesh.local".into(),
        workload_cert_ttl: Some("1h".into()),
        ..Default::default()
    });
    let anon = ca.resources(&node(None));
    assert_eq!(anon.len(), 1);
    assert_eq!(anon[0].name, ROOT_SECRET);
    let bundle = match secret(&anon[0]).r#type {
        Some(tls::secret::Type::ValidationContext(v)) => inline(&v.trusted_ca),
        other => panic!("{other:?}"),
    };
    assert_eq!(Some(bundle.clone()), ca.bundle_pem());

    let id = "spiffe://mesh.local/ns/shop/sa/cart";
    let rs = ca.resources(&node(Some(id)));
    assert_eq!(rs.len(), 2);
    let (chain, key) = match secret(&rs[1]).r#type {
        Some(tls::secret::Type::TlsCertificate(t)) => {
            (inline(&t.certificate_chain), inline(&t.private_key))
        }
        other => panic!("{other:?}"),
    };
    assert!(key.contains("PRIVATE KEY"));
    // The leaf carries exactly the SPIFFE ID, is not a CA, is valid ~1h, chains to the root.
    let der = pem_der(&chain).expect("pem");
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .expect("ext")
        .expect("san")
        .value
        .general_names
        .iter()
        .map(|g| format!("{g}"))
        .collect();
    assert_eq!(sans, [format!("URI({id})")]);
    assert!(!leaf.is_ca());
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((3600..=3600 + 61).contains(&life), "{life}");
    let root_der = pem_der(&bundle).expect("root pem");
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).expect("root");
    assert_eq!(leaf.issuer(), root.subject());
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the root");

    // Cached: the same identity gets the same certificate until renewal.
    let again = ca.resources(&node(Some(id)));
    assert!(Arc::ptr_eq(&rs[1], &again[1]));
    assert_eq!(ca.metrics.issued.load(Ordering::Relaxed), 1);
}

#[test]
fn renewal_after_half_life() {
    let ca = configured(&CaSettings {
        workload_cert_ttl: Some("10s".into()),
        ..Default::default()
    });
    let id = "spiffe://cluster.local/ns/a/sa/b";
    let first = ca.resources(&node(Some(id)))[1].clone();
    // Pretend half the lifetime has passed.
    {
        let mut issued = ca.issued.lock().expect("lock");
        let (c, _) = issued.get_mut(id).expect("cached");
        c.renew_at = SystemTime::now() - Duration::from_secs(1);
    }
    let second = ca.resources(&node(Some(id)))[1].clone();
    assert_ne!(first.version, second.version);
    assert_eq!(ca.metrics.issued.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn rotation_ticker_signals_due_certificates() {
    let ca = configured(&CaSettings {
        workload_cert_ttl: Some("20s".into()),
        ..Default::default()
    });
    let id = "spiffe://cluster.local/ns/a/sa/b";
    ca.resources(&node(Some(id)));
    let mut rx = ca.subscribe();
    rx.borrow_and_update();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(ca.clone().run_rotation(cancel.clone()));
    {
        let mut issued = ca.issued.lock().expect("lock");
        issued.get_mut(id).expect("cached").0.renew_at = SystemTime::now();
    }
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("signalled")
        .expect("open");
    cancel.cancel();
    task.await.expect("task");
}

#[test]
fn root_is_stored_once() {
    let store = RootStore::Embedded(Arc::new(crate::storage::Store::in_memory().expect("store")));
    let a = CaSource::default();
    a.configure(&CaSettings::default(), &store).expect("a");
    let b = CaSource::default();
    b.configure(&CaSettings::default(), &store).expect("b");
    assert_eq!(a.bundle_pem(), b.bundle_pem());
}

#[test]
fn supplied_intermediate_is_chained() {
    let dir = tempfile::tempdir().expect("tmp");
    // An organisation root and an intermediate for weir-cp.
    let (root_pem, root_key) = Authority::generate("org", SystemTime::now()).expect("root");
    let root = Authority::load(&root_pem, &root_key, None).expect("load root");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("p");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.distinguished_name.push(
        rcgen::DnType::CommonName,
        "weir-cp intermediate".to_string(),
    );
    let inter = p.signed_by(&key, &root.issuer).expect("sign");
    let w = |n: &str, s: &str| {
        let path = dir.path().join(n);
        std::fs::write(&path, s).expect("write");
        Some(path)
    };
    let ca = configured(&CaSettings {
        root_cert_file: w("ca.pem", &inter.pem()),
        root_key_file: w("ca.key", &key.serialize_pem()),
        trust_bundle_file: w("bundle.pem", &root_pem),
        ..Default::default()
    });
    assert_eq!(ca.bundle_pem().as_deref(), Some(root_pem.as_str()));
    let rs = ca.resources(&node(Some("spiffe://cluster.local/ns/a/sa/b")));
    let chain = match secret(&rs[1]).r#type {
        Some(tls::secret::Type::TlsCertificate(t)) => inline(&t.certificate_chain),
        other => panic!("{other:?}"),
    };
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(chain.ends_with(&inter.pem()));
}

#[test]
fn bad_settings_are_refused() {
    let store = RootStore::Embedded(Arc::new(crate::storage::Store::in_memory().expect("store")));
    for s in [
        CaSettings {
            trust_domain: "Bad Domain".into(),
            ..Default::default()
        },
        CaSettings {
            workload_cert_ttl: Some("5s".into()),
            ..Default::default()
        },
        CaSettings {
            root_cert_file: Some("/nonexistent".into()),
            ..Default::default()
        },
    ] {
        assert!(CaSource::default().configure(&s, &store).is_err(), "{s:?}");
    }
    // Disabled: nothing served.
    let ca = CaSource::default();
    ca.configure(
        &CaSettings {
            disabled: true,
            ..Default::default()
        },
        &store,
    )
    .expect("disabled");
    assert!(
        ca.resources(&node(Some("spiffe://cluster.local/ns/a/sa/b")))
            .is_empty()
    );
}
