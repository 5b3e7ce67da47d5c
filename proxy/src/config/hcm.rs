//! `envoy.filters.network.http_connection_manager` config.

use std::sync::Arc;

use weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;

use crate::config::{Errors, TranslateCtx};
use crate::route::RouteTable;

/// Translated HTTP connection manager.
#[derive(Debug)]
pub struct HcmConfig {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// Inline route config.
    pub routes: Arc<RouteTable>,
}

/// Translate an HCM `typed_config` (already unpacked) at `path`.
pub fn translate_hcm(
    h: &HttpConnectionManager,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<HcmConfig> {
    let rc = h.route_specifier.as_ref();
    let _ = rc;
    Some(HcmConfig {
        stat_prefix: h.stat_prefix.clone(),
        routes: Arc::new(RouteTable::translate(&Default::default(), path, ctx, errs)),
    })
}
