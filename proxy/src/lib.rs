//! # weir-proxy
//!
//! An Envoy-config L4/L7 proxy. The `weir` binary (`main.rs`) is a thin CLI over [`server`].
//!
//! ## Layout
//! - [`cli`]: Envoy-compatible command-line flags.
//! - [`config`]: Envoy v3 bootstrap (protobuf, from `weir-xds-api`) -> validated, immutable
//!   [`config::Snapshot`]. Every rejected field is reported with its path. Protobuf stays here:
//!   nothing past translation sees a proto type.
//!   - [`config::hcm`]: HTTP connection manager settings; routes live in [`route`], clusters in
//!     [`upstream`], listeners and filter chains in [`listener`], each with its own translation.
//! - [`route`]: compiled route tables: virtual host and route matching, rewrites, redirects,
//!   header mutations.
//! - [`upstream`]: cluster manager: clusters, host sets (STATIC, STRICT_DNS), load balancing,
//!   per-worker HTTP/1 and HTTP/2 connection pools, TCP connects.
//! - [`listener`]: workers, SO_REUSEPORT listening sockets, filter-chain selection, and the
//!   `tcp_proxy` network filter (splice on Linux).
//! - [`http`]: the HTTP connection manager: hyper server per connection (h1/h2), limits,
//!   header sanitation, the HTTP filter chain, the router, local replies.
//! - [`admin`]: the admin server (`/ready`, `/stats`, `/config_dump`, `/clusters`, ...).
//! - [`stats`]: Envoy-named stats on the `metrics` crate with a Prometheus exporter.
//! - [`server`]: process lifecycle: start workers, admin, drain and shutdown.
//! - [`hot_restart`]: zero-downtime binary upgrade (listening sockets passed to a new
//!   process over a Unix socket).
//! - [`init`]: `weir-init`'s iptables rules for transparent sidecar interception.
//!
//! Threading follows Envoy: a main runtime (admin, DNS, timers) and N worker threads each with
//! a single-threaded tokio runtime, their own listening sockets and their own upstream pools.
//! Config is an `Arc<Snapshot>` in an `ArcSwap`; a connection pins the listener config it was
//! accepted with.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod config;
pub mod hot_restart;
pub mod http;
pub mod init;
pub mod listener;
pub mod overload;
pub mod route;
pub mod server;
pub mod stats;
pub mod text;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod xds;
