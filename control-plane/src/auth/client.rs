//! The client side, for every CLI subcommand that talks to weir-cp: `--token` (or the
//! `WEIR_CP_TOKEN` environment variable) sent as `authorization: Bearer TOKEN`, and TLS with
//! `--ca-file` (the server's CA; turns TLS on) plus optionally `--cert-file`/`--key-file`
//! (a client certificate, for mTLS).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The CLI's credential flags (flattened into each client subcommand).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientAuthArgs {
    /// Bearer token for weir-cp's APIs (sent as `authorization: Bearer TOKEN`).
    #[arg(long, global = true, env = "WEIR_CP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify weir-cp's TLS certificate; connects over TLS.
    #[arg(long = "ca-file", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS (with --key-file and --ca-file).
    #[arg(long = "cert-file", global = true)]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of --cert-file.
    #[arg(long = "key-file", global = true)]
    pub key_file: Option<PathBuf>,
}

/// The PEM files of [`ClientAuthArgs`], read.
struct TlsFiles {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientAuthArgs {
    fn tls_files(&self) -> anyhow::Result<Option<TlsFiles>> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => anyhow::bail!("--cert-file and --key-file go together"),
        };
        match &self.ca_file {
            Some(ca) => Ok(Some(TlsFiles {
                ca: read(ca)?,
                identity,
            })),
            None if identity.is_some() => {
                anyhow::bail!("--cert-file needs --ca-file (TLS to weir-cp)")
            }
            None => Ok(None),
        }
    }

    fn header_value(&self) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
        match self.token.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(t) => {
                let mut v: MetadataValue<Ascii> = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
                v.set_sensitive(true);
                Ok(Some(v))
            }
        }
    }

    /// An HTTP client of the config API at `addr` with these credentials.
    pub fn api_client(&self, addr: &str) -> anyhow::Result<crate::api::Client> {
        let mut c = crate::api::Client::new(addr);
        if let Some(v) = self.header_value()? {
            c = c.with_authorization(
                http::HeaderValue::from_bytes(v.as_bytes()).context("token header")?,
            );
        }
        if let Some(files) = self.tls_files()? {
            let cfg = super::tls::client_config(
                &files.ca,
                files
                    .identity
                    .as_ref()
                    .map(|(c, k)| (c.as_slice(), k.as_slice())),
            )?;
            c = c.with_tls(cfg);
        }
        Ok(c)
    }

    /// A gRPC channel to `server` (`host:port` or a URL; `https` when --ca-file is given)
    /// that sends the token on every call.
    pub async fn grpc_channel(&self, server: &str) -> anyhow::Result<AuthChannel> {
        let tls = self.tls_files()?;
        let url = if server.contains("://") {
            server.to_string()
        } else if tls.is_some() {
            format!("https://{server}")
        } else {
            format!("http://{server}")
        };
        let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad --server {server:?}"))?
            .connect_timeout(Duration::from_secs(5))
            // No Nagle stalls on small calls (tonic's default, made explicit).
            .tcp_nodelay(true);
        if let Some(files) = tls {
            let mut cfg = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&files.ca));
            if let Some((c, k)) = &files.identity {
                cfg = cfg.identity(tonic::transport::Identity::from_pem(c, k));
            }
            ep = ep.tls_config(cfg).context("TLS settings")?;
        }
        let channel = ep
            .connect()
            .await
            .with_context(|| format!("connecting to weir-cp at {url}"))?;
        Ok(InterceptedService::new(
            channel,
            TokenInterceptor(self.header_value()?),
        ))
    }
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Debug, Clone)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel sending credentials.
pub type AuthChannel = InterceptedService<Channel, TokenInterceptor>;
