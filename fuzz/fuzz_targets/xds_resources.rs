//! An xDS file / DiscoveryResponse text -> parse (for each resource type) -> translate every
//! resource with the translators the xDS client uses (Cluster, ClusterLoadAssignment,
//! Listener with RDS, RouteConfiguration as RDS delivers it). No step may panic.
#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use weir_proxy::config::{Errors, TranslateCtx};
use weir_proxy::route::{RdsRegistry, RouteTable};
use weir_proxy::stats::Store;
use weir_proxy::upstream::DiscoveryType;
use weir_proxy::xds;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let store = Store::new();
    let rds = Arc::new(RdsRegistry::default());
    let clusters: HashSet<&str> = ["svc", "a", "b"].into_iter().collect();
    for ty in [xds::CLUSTER, xds::ENDPOINT, xds::LISTENER, xds::ROUTE] {
        let Ok((_, resources)) = xds::fs::parse(text, ty, Path::new("fuzz.yaml")) else {
            continue;
        };
        for r in resources {
            let mut errs = Errors::default();
            match ty {
                xds::CLUSTER => {
                    if let Ok(c) = weir_xds_api::unpack(&r.body) {
                        let _ = weir_proxy::upstream::translate_cluster(&c, "", &mut errs);
                    }
                }
                xds::ENDPOINT => {
                    if let Ok(c) = weir_xds_api::unpack(&r.body) {
                        let _ = weir_proxy::upstream::translate::translate_load_assignment(
                            &c,
                            DiscoveryType::Eds,
                            "",
                            &mut errs,
                        );
                    }
                }
                xds::LISTENER => {
                    if let Ok(l) = weir_xds_api::unpack(&r.body) {
                        let ctx = TranslateCtx {
                            clusters: &clusters,
                            stats: &store,
                            rds: Some(&rds),
                            rds_table: false,
                        };
                        let _ = weir_proxy::listener::translate_listener(&l, "", &ctx, &mut errs);
                    }
                }
                _ => {
                    if let Ok(rc) = weir_xds_api::unpack(&r.body) {
                        let ctx = TranslateCtx {
                            clusters: &clusters,
                            stats: &store,
                            rds: None,
                            rds_table: true,
                        };
                        let _ = RouteTable::translate(&rc, "", &ctx, &mut errs);
                    }
                }
            }
        }
    }
});
