//! Optional API keys for the public API (checked by every Generation call): `authorization: Bearer <key>`,
//! compared in constant time; UNAUTHENTICATED otherwise. Health and
//! reflection stay open for probes.

use std::path::PathBuf;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// Accept these API keys (comma-separated); none: no authentication.
    #[arg(
        long,
        env = "SD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Read more API keys from this file, one per line.
    #[arg(long, env = "SD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
}

impl AuthArgs {
    pub fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(f) = &self.api_keys_file {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        Ok(keys)
    }
}

/// The accepted bearer tokens.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<Vec<u8>>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Self {
        ApiKeys {
            keys: Arc::new(keys.into_iter().map(String::into_bytes).collect()),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether `token` is one of the keys; every key is compared, in constant time.
    pub fn accepts(&self, token: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for k in self.keys.iter() {
            ok |= k.as_slice().ct_eq(token);
        }
        bool::from(ok)
    }
}

impl ApiKeys {
    /// Check a request's bearer token (every call of the public API does).
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match token {
            Some(t) if self.accepts(t.as_bytes()) => Ok(()),
            Some(_) => Err(Error::Unauthenticated("invalid API key")),
            None => Err(Error::Unauthenticated(
                "missing API key: send `authorization: Bearer <key>`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Request;

    fn with(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn bearer_keys() {
        let k = ApiKeys::new(vec!["s3cret".into(), "other".into()]);
        let check = |r: Request<()>| k.check(r.metadata());
        assert!(check(with(Some("Bearer s3cret"))).is_ok());
        assert!(check(with(Some("Bearer other"))).is_ok());
        let code = |r: Result<()>| tonic::Status::from(r.unwrap_err()).code();
        assert_eq!(
            code(check(with(Some("Bearer s3cre")))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(check(with(Some("s3cret")))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(code(check(with(None))), tonic::Code::Unauthenticated);
        let open = ApiKeys::new(vec![]);
        assert!(open.check(with(None).metadata()).is_ok());
    }
}
