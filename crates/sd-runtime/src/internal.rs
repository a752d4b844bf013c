//! The shared internal token between the gateway and the model services.
//!
//! The model services require `authorization: Bearer <token>` on every call
//! when a token is set (health and reflection stay open: the kubelet's gRPC
//! probes send no metadata), compared in constant time; the gateway sends
//! it on every call. The token comes from a file (`--internal-token-file`)
//! or the environment (`SD_INTERNAL_TOKEN`) — never from a command-line
//! value, which anyone on the machine could read in `ps`.

use std::ffi::OsString;
use std::path::PathBuf;

use subtle::ConstantTimeEq;
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::Status;

pub use sd_proto::{INTERNAL_TOKEN_ENV as TOKEN_ENV, INTERNAL_TOKEN_FILE_ENV as TOKEN_FILE_ENV};
/// Shortest token accepted (bytes): a token is a random secret, not a word.
pub const MIN_LEN: usize = 16;
/// Longest token accepted (bytes).
pub const MAX_LEN: usize = 1024;

/// The internal token's flag (its value is read from the environment
/// variable `SD_INTERNAL_TOKEN` or from this file, never from argv).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct InternalTokenArgs {
    /// File holding the internal token shared by the gateway and the model
    /// services (or set SD_INTERNAL_TOKEN): model services then refuse any
    /// call without it (health and reflection stay open), the gateway sends
    /// it. Unset: the model services are open to anyone who can reach them.
    #[arg(long, env = TOKEN_FILE_ENV)]
    pub internal_token_file: Option<PathBuf>,
}

impl InternalTokenArgs {
    /// The token from the file or `SD_INTERNAL_TOKEN`, checked; `None` when
    /// neither is set. Both set is an error (which one was meant?).
    pub fn load(&self) -> anyhow::Result<Option<InternalToken>> {
        self.load_with(std::env::var_os(TOKEN_ENV))
    }

    fn load_with(&self, env: Option<OsString>) -> anyhow::Result<Option<InternalToken>> {
        let env = env.filter(|v| !v.is_empty());
        let (text, source) = match (&self.internal_token_file, env) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both --internal-token-file and {TOKEN_ENV} are set: give the internal token one way"
            ),
            (Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("internal token file {}: {e}", path.display()))?;
                (text, format!("internal token file {}", path.display()))
            }
            (None, Some(v)) => {
                let text = v
                    .into_string()
                    .map_err(|_| anyhow::anyhow!("{TOKEN_ENV} is not UTF-8"))?;
                (text, TOKEN_ENV.to_string())
            }
            (None, None) => return Ok(None),
        };
        InternalToken::new(text.trim())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))
    }
}

/// A checked internal token.
#[derive(Clone)]
pub struct InternalToken {
    token: Vec<u8>,
    header: MetadataValue<Ascii>,
}

impl std::fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternalToken(<redacted>)")
    }
}

impl InternalToken {
    /// A token: `MIN_LEN..=MAX_LEN` visible ASCII characters (it travels in
    /// a header), no spaces. The error never quotes the token.
    pub fn new(token: &str) -> anyhow::Result<Self> {
        if !(MIN_LEN..=MAX_LEN).contains(&token.len()) {
            anyhow::bail!(
                "the token has {} bytes; {MIN_LEN}..={MAX_LEN} needed",
                token.len()
            );
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("the token must be visible ASCII characters without spaces");
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the token cannot travel in a header"))?;
        Ok(InternalToken {
            token: token.as_bytes().to_vec(),
            header,
        })
    }

    /// Whether a call's headers carry this token (`authorization: Bearer
    /// <token>`, compared in constant time); UNAUTHENTICATED otherwise, with
    /// a short message that quotes nothing the caller sent.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Status> {
        let Some(value) = headers.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing internal token: send `authorization: Bearer <token>`",
            ));
        };
        let given = value.as_bytes();
        let given = given
            .strip_prefix(b"Bearer ")
            .or_else(|| given.strip_prefix(b"bearer "))
            .unwrap_or(b"");
        if bool::from(self.token.as_slice().ct_eq(given)) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid internal token"))
        }
    }
}

/// A client interceptor that puts the internal token (when there is one)
/// on every call, unary and streaming alike.
#[derive(Clone, Debug, Default)]
pub struct SendToken(Option<InternalToken>);

impl SendToken {
    pub fn new(token: Option<InternalToken>) -> Self {
        SendToken(token)
    }
}

impl tonic::service::Interceptor for SendToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(t) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", t.header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    const TOKEN: &str = "0123456789abcdef0123";

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().expect("header"));
        }
        h
    }

    #[test]
    fn only_the_token_passes() {
        let t = InternalToken::new(TOKEN).expect("token");
        assert!(t.check(&headers(Some(&format!("Bearer {TOKEN}")))).is_ok());
        for bad in [
            None,
            Some(TOKEN),
            Some("Bearer 0123456789abcdef012"),
            Some("Bearer 0123456789abcdef01234"),
            Some("Bearer "),
            Some("Basic 0123456789abcdef0123"),
        ] {
            let e = t.check(&headers(bad)).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
            assert!(!e.message().contains(TOKEN), "{e:?}");
        }
    }

    #[test]
    fn tokens_are_checked_and_never_quoted() {
        for bad in ["short", "has a space in it, long", "tab\there-0123456789"] {
            let e = InternalToken::new(bad).expect_err(bad).to_string();
            assert!(!e.contains(bad), "{e}");
        }
        assert!(InternalToken::new(&"x".repeat(MAX_LEN + 1)).is_err());
        assert_eq!(
            format!("{:?}", InternalToken::new(TOKEN).expect("token")),
            "InternalToken(<redacted>)"
        );
    }

    #[test]
    fn from_a_file_or_the_environment_not_both() {
        let dir = std::env::temp_dir().join(format!("sd-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, format!("{TOKEN}\n")).expect("write");
        let from_file = InternalTokenArgs {
            internal_token_file: Some(file.clone()),
        };
        let none = InternalTokenArgs::default();
        assert!(none.load_with(None).expect("ok").is_none());
        assert!(none.load_with(Some("".into())).expect("ok").is_none());
        let t = from_file.load_with(None).expect("ok").expect("some");
        assert!(t.check(&headers(Some(&format!("Bearer {TOKEN}")))).is_ok());
        assert!(none.load_with(Some(TOKEN.into())).expect("ok").is_some());
        assert!(from_file.load_with(Some(TOKEN.into())).is_err());
        let missing = InternalTokenArgs {
            internal_token_file: Some(dir.join("absent")),
        };
        assert!(missing.load_with(None).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_client_side_sends_it() {
        let mut send = SendToken::new(Some(InternalToken::new(TOKEN).expect("token")));
        let r = send.call(tonic::Request::new(())).expect("ok");
        assert_eq!(
            r.metadata()
                .get("authorization")
                .expect("sent")
                .to_str()
                .ok(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        let r = SendToken::default()
            .call(tonic::Request::new(()))
            .expect("ok");
        assert!(r.metadata().get("authorization").is_none());
    }
}
