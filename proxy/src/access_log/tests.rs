use super::*;
use crate::stats::Store;

fn translate_yaml(yaml: &str) -> Result<AccessLogs, Vec<(String, String)>> {
    let logs: Vec<alpb::AccessLog> = serde_yaml::from_str::<Vec<serde_json::Value>>(yaml)
        .map_err(|e| vec![(String::new(), e.to_string())])?
        .into_iter()
        .map(|v| {
            weir_xds_api::from_yaml::<alpb::AccessLog>(
                &serde_json::to_string(&v).unwrap_or_default(),
            )
            .map_err(|e| vec![(String::new(), e.to_string())])
        })
        .collect::<Result<_, _>>()?;
    let clusters = std::collections::HashSet::new();
    let stats = Store::new();
    let ctx = TranslateCtx {
        clusters: &clusters,
        stats: &stats,
        rds: None,
        rds_table: false,
    };
    let mut errs = Errors::default();
    let out = translate(&logs, "hcm.access_log", &ctx, &mut errs);
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs.0.into_iter().map(|e| (e.path, e.message)).collect())
    }
}

fn tmp(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("weir-alt-{}-{name}.log", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn file_stdout_and_filters_translate() {
    let p = tmp("ok");
    let logs = translate_yaml(&format!(
        "- name: f\n  filter: {{and_filter: {{filters: [{{status_code_filter: {{comparison: {{op: GE, value: {{default_value: 500, runtime_key: k}}}}}}}}, {{not_health_check_filter: {{}}}}]}}}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {p}\n    log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE% %REQ(X-A)%\\n\"}}}}\n\
         - name: s\n  filter: {{response_flag_filter: {{flags: [UH, NR]}}}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n\
         - name: j\n  filter: {{header_filter: {{header: {{name: x-log, present_match: true}}}}}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {p}\n    json_format: {{code: '%RESPONSE_CODE%'}}\n"
    ))
    .expect("valid");
    assert_eq!(logs.loggers().len(), 3);
    assert!(logs.needs_request_headers());
    // Same path: one sink.
    assert!(Arc::ptr_eq(
        &logs.loggers()[0].sink,
        &logs.loggers()[2].sink
    ));
    assert_eq!(logs.loggers()[1].sink.target(), &Target::Stdout);

    let f = logs.loggers()[0].filter.as_ref().expect("filter");
    let mut rec = LogRecord {
        response_code: 503,
        ..Default::default()
    };
    assert!(f.evaluate(&rec, 0));
    rec.is_health_check = true;
    assert!(!f.evaluate(&rec, 0));
    rec.is_health_check = false;
    rec.response_code = 200;
    assert!(!f.evaluate(&rec, 0));

    let f = logs.loggers()[1].filter.as_ref().expect("filter");
    assert!(!f.evaluate(&rec, 0));
    rec.flags.set(Flag::NoRouteFound);
    assert!(f.evaluate(&rec, 0));

    let f = logs.loggers()[2].filter.as_ref().expect("filter");
    let mut h = http::HeaderMap::new();
    assert!(!f.evaluate(
        &LogRecord {
            request_headers: Some((&h).into()),
            ..Default::default()
        },
        0
    ));
    h.insert("x-log", "1".parse().expect("v"));
    assert!(f.evaluate(
        &LogRecord {
            request_headers: Some((&h).into()),
            ..Default::default()
        },
        0
    ));
    let _ = std::fs::remove_file(&p);
}

#[test]
fn default_format_when_none_given() {
    let p = tmp("default");
    let logs = translate_yaml(&format!(
        "- name: f\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {p}\n"
    ))
    .expect("valid");
    let Formatter::Text(f) = &logs.loggers()[0].format else {
        panic!("text expected");
    };
    assert_eq!(f, &Format::parse(format::DEFAULT_FORMAT).expect("parses"));
    let _ = std::fs::remove_file(&p);
}

#[test]
fn filter_logic_and_runtime() {
    let or = Filter::Or(vec![
        Filter::StatusCode(Cmp::Eq, 404),
        Filter::Duration(Cmp::Ge, 100),
    ]);
    let mut rec = LogRecord {
        response_code: 404,
        ..Default::default()
    };
    assert!(or.evaluate(&rec, 0));
    rec.response_code = 200;
    assert!(!or.evaluate(&rec, 0));
    rec.duration = Some(std::time::Duration::from_millis(150));
    assert!(or.evaluate(&rec, 0));
    let rt = Filter::Runtime(Fraction {
        numerator: 10,
        denominator: 100,
    });
    assert!(rt.evaluate(&rec, 9));
    assert!(!rt.evaluate(&rec, 10));
    assert!(rt.evaluate(&rec, 105));
    assert!(Filter::ResponseFlag(ResponseFlags::default()).evaluate(
        &LogRecord {
            flags: ResponseFlags(1),
            ..Default::default()
        },
        0
    ));
    assert!(!Filter::Traceable.evaluate(&rec, 0));
}

#[test]
fn bad_configs_have_paths() {
    let e = translate_yaml(
        "- name: f\n  filter: {status_code_filter: {}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: ''\n\
         - name: g\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: /tmp/x.log\n    format: '%BOGUS%'\n\
         - name: h\n  filter: {response_flag_filter: {flags: [ZZ]}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog\n    log_format: {json_format: {a: {b: '%REQ%'}}}\n\
         - name: i\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig\n\
         - name: k\n  filter: {or_filter: {filters: [{not_health_check_filter: {}}]}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: /nonexistent-dir/a.log\n",
    )
    .expect_err("invalid");
    let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "hcm.access_log[0].filter.status_code_filter.comparison",
        "hcm.access_log[0].typed_config.path",
        "hcm.access_log[1].typed_config.format",
        "hcm.access_log[2].filter.response_flag_filter.flags[0]",
        "hcm.access_log[2].typed_config.log_format.json_format.a.b",
        "hcm.access_log[3].typed_config",
        "hcm.access_log[4].filter.or_filter.filters",
        "hcm.access_log[4].typed_config.path",
    ] {
        assert!(paths.contains(&want), "{want} missing in {e:?}");
    }
}

#[test]
fn only_the_headers_formats_read_are_kept() {
    let p = tmp("needs");
    let logs = translate_yaml(&format!(
        "- name: f\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {p}\n\
         - name: j\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {p}\n    json_format: {{a: '%REQ(X-A?X-B)%', n: {{t: '%TRAILER(grpc-status)%', r: '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%'}}}}\n"
    ))
    .expect("valid");
    let names = |n: &HeaderNeeds| match n {
        HeaderNeeds::Some(v) => v.iter().map(|h| h.as_str().to_string()).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    // The default format's REQ(:METHOD) / REQ(:AUTHORITY) / :PATH read no header map.
    assert_eq!(
        names(logs.request_headers()),
        [
            "x-envoy-original-path",
            "x-forwarded-for",
            "user-agent",
            "x-request-id",
            "x-a",
            "x-b"
        ]
    );
    assert_eq!(
        names(logs.response_headers()),
        ["x-envoy-upstream-service-time", "grpc-status"]
    );
    let mut h = http::HeaderMap::new();
    h.insert("user-agent", "curl".parse().expect("v"));
    h.append("x-forwarded-for", "1.1.1.1".parse().expect("v"));
    h.append("x-forwarded-for", "2.2.2.2".parse().expect("v"));
    h.insert("x-unrelated", "zzz".parse().expect("v"));
    let kept = logs.request_headers().capture(&h).expect("kept");
    let KeptHeaders::List(pairs) = &kept else {
        panic!("{kept:?}")
    };
    let shown: Vec<_> = pairs
        .iter()
        .map(|(n, v)| format!("{n}={}", v.to_str().expect("ascii")))
        .collect();
    assert_eq!(
        shown,
        [
            "x-forwarded-for=1.1.1.1",
            "x-forwarded-for=2.2.2.2",
            "user-agent=curl"
        ]
    );
    // Lines read the kept pairs as they read the whole map: repeated values joined, absent
    // ones `-`, the alternative used when the first is absent.
    let f = Format::parse(
        "%REQ(X-FORWARDED-FOR)% %REQ(USER-AGENT)% %REQ(X-UNRELATED)% %REQ(X-A?USER-AGENT)%",
    )
    .expect("format");
    let line = |v: HeaderView<'_>| {
        f.render(&LogRecord {
            request_headers: Some(v),
            ..Default::default()
        })
    };
    assert_eq!(line(kept.view()), "1.1.1.1,2.2.2.2 curl - curl");
    let mut without = h.clone();
    without.remove("x-unrelated");
    assert_eq!(line(kept.view()), line((&without).into()));
    // A header filter matches on the whole map; no %REQ% at all keeps nothing.
    let logs = translate_yaml(&format!(
        "- name: h\n  filter: {{header_filter: {{header: {{name: x-log, present_match: true}}}}}}\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {p}\n    log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE%\\n\"}}}}\n"
    ))
    .expect("valid");
    assert_eq!(logs.request_headers(), &HeaderNeeds::All);
    match logs.request_headers().capture(&h).expect("all") {
        KeptHeaders::Map(m) => assert_eq!(m, h),
        other => panic!("{other:?}"),
    }
    assert!(logs.response_headers().is_nothing());
    assert!(logs.response_headers().capture(&h).is_none());
    let _ = std::fs::remove_file(&p);
}
