//! `envoy.filters.network.http_connection_manager` config.

use std::sync::Arc;

use crate::route::RouteTable;

/// Translated HTTP connection manager.
#[derive(Debug)]
pub struct HcmConfig {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// Inline route config.
    pub routes: Arc<RouteTable>,
}
