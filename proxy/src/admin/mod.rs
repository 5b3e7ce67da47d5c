//! The admin server: Envoy's admin paths on `admin.address`.
//!
//! OWNER: admin helper.

use std::sync::Arc;

use crate::server::ServerState;

/// Serve the admin API on `listener` until `state.shutdown` fires.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ServerState>) {
    let _ = (listener, state);
}
