//! The HTTP connection manager: serves one downstream connection with hyper (HTTP/1.1 and
//! HTTP/2), applies limits and header sanitation, runs the HTTP filters and the router.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::hcm::HcmConfig;
use crate::listener::ConnInfo;
use crate::server::ServerState;

/// Serve one downstream connection until it closes, the drain completes or `hard_stop`.
pub async fn serve_connection<I>(
    io: I,
    cfg: Arc<HcmConfig>,
    conn: ConnInfo,
    state: Arc<ServerState>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = (io, cfg, conn, state);
}
