//! Optional API keys for the public API (checked by every Generation call): `authorization: Bearer <key>`,
//! compared in constant time; UNAUTHENTICATED otherwise. Health and
//! reflection stay open for probes. Keys come from a file or the
//! environment; `--api-keys` on the command line is refused at start (it
//! would show in `ps`).

use std::path::PathBuf;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The environment variable holding API keys (comma-separated).
pub const KEYS_ENV: &str = "SD_API_KEYS";

#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// Read API keys from this file, one per line (`#` starts a comment);
    /// or set SD_API_KEYS (comma-separated). Neither: no authentication.
    #[arg(long, env = "SD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Refused: keys on the command line show in `ps`.
    #[arg(long = "api-keys", hide = true, value_name = "KEYS")]
    pub api_keys_argv: Option<String>,
}

impl AuthArgs {
    /// The keys from the file and from `SD_API_KEYS`, never from argv.
    pub fn keys(&self) -> anyhow::Result<Vec<String>> {
        self.keys_with(std::env::var(KEYS_ENV).ok())
    }

    fn keys_with(&self, env: Option<String>) -> anyhow::Result<Vec<String>> {
        if self.api_keys_argv.is_some() {
            anyhow::bail!(
                "--api-keys is refused: keys on the command line show in `ps` to every user of \
                 the machine; put them in a file (--api-keys-file) or in {KEYS_ENV}"
            );
        }
        let mut keys: Vec<String> = env
            .iter()
            .flat_map(|v| v.split(','))
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
        self.check_authorization(metadata.get("authorization").and_then(|v| v.to_str().ok()))
    }

    /// Check an `authorization` value: `Bearer <key>`, or (for
    /// AUTOMATIC1111 clients, whose API takes HTTP Basic) `Basic` with the
    /// key as the password.
    pub fn check_authorization(&self, value: Option<&str>) -> Result<()> {
        self.owner(value).map(|_| ())
    }

    /// The owner of what a caller keeps (async jobs): a digest of its
    /// accepted key (SHA-256, the first 16 bytes in hex), the same from
    /// every gateway and for every way of sending the key; `open` without
    /// keys. UNAUTHENTICATED as [`ApiKeys::check_authorization`] says.
    pub fn owner(&self, value: Option<&str>) -> Result<String> {
        use sha2::Digest;
        if !self.enabled() {
            return Ok("open".into());
        }
        let token = value.and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(|t| t.trim().as_bytes().to_vec())
                .or_else(|| basic_password(v))
        });
        match token {
            Some(t) if self.accepts(&t) => {
                let digest = sha2::Sha256::digest(&t);
                Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
            }
            Some(_) => Err(Error::Unauthenticated("invalid API key")),
            None => Err(Error::Unauthenticated(
                "missing API key: send `authorization: Bearer <key>`",
            )),
        }
    }

    /// A short digest of the caller's key (None without keys): tells
    /// callers apart without keeping their keys.
    pub fn caller(&self, value: Option<&str>) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        if !self.enabled() {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.unwrap_or("").hash(&mut h);
        Some(h.finish())
    }
}

/// The password of an HTTP Basic `authorization` value.
fn basic_password(v: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let colon = raw.iter().position(|&b| b == b':')?;
    Some(raw[colon + 1..].to_vec())
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
        // HTTP Basic, the key as the password (AUTOMATIC1111 clients).
        assert!(k
            .check_authorization(Some("Basic dXNlcjpzM2NyZXQ="))
            .is_ok());
        assert!(k
            .check_authorization(Some("Basic dXNlcjp3cm9uZw=="))
            .is_err());
        assert!(k.check_authorization(Some("Basic !!!")).is_err());
        // The owner of a key's jobs: one digest however the key is sent.
        let owner = k.owner(Some("Bearer s3cret")).unwrap();
        assert_eq!(owner.len(), 32);
        assert_eq!(k.owner(Some("Basic dXNlcjpzM2NyZXQ=")).unwrap(), owner);
        assert_ne!(k.owner(Some("Bearer other")).unwrap(), owner);
        assert!(k.owner(Some("Bearer nope")).is_err());
        let open = ApiKeys::new(vec![]);
        assert!(open.check(with(None).metadata()).is_ok());
    }

    #[test]
    fn keys_come_from_a_file_or_the_environment_never_argv() {
        let dir = std::env::temp_dir().join(format!("sd-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# ours\nk-file\n\n  k-two  \n").unwrap();
        let args = AuthArgs {
            api_keys_file: Some(file),
            api_keys_argv: None,
        };
        assert_eq!(
            args.keys_with(Some(" k-env, ,k-env2".into())).unwrap(),
            ["k-env", "k-env2", "k-file", "k-two"]
        );
        assert!(AuthArgs::default().keys_with(None).unwrap().is_empty());
        let argv = AuthArgs {
            api_keys_argv: Some("k-argv".into()),
            ..AuthArgs::default()
        };
        let e = argv.keys_with(None).unwrap_err().to_string();
        assert!(
            e.contains("--api-keys-file") && !e.contains("k-argv"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
