//! TLS and mutual TLS (rustls) for every hop: servers present a certificate
//! and may require client certificates signed by a CA; clients verify the
//! server against a CA and may present their own certificate.

use std::path::PathBuf;

use crate::internal::InternalTokenArgs;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

/// A server's transport security: TLS, mutual TLS, and the internal token
/// (which the model services require and the gateway sends).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key for --tls-cert (PEM).
    #[arg(long, env = "SD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "SD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub internal: InternalTokenArgs,
}

impl ServerTlsArgs {
    pub fn config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(
            read(cert, "certificate")?,
            read(key, "key")?,
        ));
        if let Some(ca) = &self.tls_client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(Some(cfg))
    }
}

/// A client's TLS flags (the gateway toward the model services).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// Connect to the model services over TLS, verifying them with this CA (PEM).
    #[arg(long, env = "SD_BACKEND_TLS_CA")]
    pub backend_tls_ca: Option<PathBuf>,
    /// Client certificate to present to the model services (mutual TLS).
    #[arg(long, env = "SD_BACKEND_TLS_CERT", requires_all = ["backend_tls_key", "backend_tls_ca"])]
    pub backend_tls_cert: Option<PathBuf>,
    /// Private key for --backend-tls-cert.
    #[arg(long, env = "SD_BACKEND_TLS_KEY", requires = "backend_tls_cert")]
    pub backend_tls_key: Option<PathBuf>,
    /// Server name to verify instead of each URL's host.
    #[arg(long, env = "SD_BACKEND_TLS_DOMAIN")]
    pub backend_tls_domain: Option<String>,
}

/// Loaded client TLS settings.
#[derive(Clone)]
pub struct ClientTls {
    ca: Certificate,
    identity: Option<Identity>,
    domain: Option<String>,
}

impl ClientTlsArgs {
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = &self.backend_tls_ca else {
            return Ok(None);
        };
        let identity = match (&self.backend_tls_cert, &self.backend_tls_key) {
            (Some(c), Some(k)) => {
                Some(Identity::from_pem(read(c, "certificate")?, read(k, "key")?))
            }
            _ => None,
        };
        Ok(Some(ClientTls {
            ca: Certificate::from_pem(read(ca, "CA")?),
            identity,
            domain: self.backend_tls_domain.clone(),
        }))
    }
}

impl ClientTls {
    /// The rustls client config for one endpoint URL.
    pub fn config_for(&self, url: &str) -> anyhow::Result<ClientTlsConfig> {
        let host = match &self.domain {
            Some(d) => d.clone(),
            None => {
                let uri: tonic::codegen::http::Uri =
                    url.parse().map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
                uri.host().unwrap_or("localhost").to_string()
            }
        };
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(host);
        if let Some(id) = &self.identity {
            cfg = cfg.identity(id.clone());
        }
        Ok(cfg)
    }
}
