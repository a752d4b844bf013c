//! Webhooks as the Standard Webhooks specification defines them (the first
//! piece of the async jobs API): a secret `whsec_<base64>`, and each
//! delivery signed with three headers — `webhook-id` (stable across
//! retries, so receivers drop repeats), `webhook-timestamp` (Unix seconds)
//! and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
//! Where a webhook may go is the operator's list (`--webhook-allow`): only
//! `http`/`https` URLs to hosts it names, never to an internal address a
//! client chooses.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a secret as the specification writes it.
const PREFIX: &str = "whsec_";
/// Secret lengths the specification allows, in bytes.
const MIN_SECRET: usize = 24;
const MAX_SECRET: usize = 64;

/// A webhook signing secret: its bytes (the base64 after `whsec_`).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// A secret as `--webhook-secret-file` holds it: `whsec_` and base64
    /// (the prefix may be left out), surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let text = text.trim();
        let b64 = text.strip_prefix(PREFIX).unwrap_or(text);
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| format!("not {PREFIX} and base64: {e}"))?;
        if !(MIN_SECRET..=MAX_SECRET).contains(&bytes.len()) {
            return Err(format!(
                "{} bytes, a secret has {MIN_SECRET} to {MAX_SECRET}",
                bytes.len()
            ));
        }
        Ok(Secret(bytes))
    }

    /// The `webhook-signature` value for a message: `v1,` and the base64
    /// HMAC-SHA256 of `id.timestamp.body`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", STANDARD.encode(self.mac(id, timestamp, body)))
    }

    /// The three headers a delivery carries.
    pub fn headers(&self, id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
        [
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.sign(id, timestamp, body)),
        ]
    }

    /// Whether `signatures` (the header's space-separated `v1,…` entries)
    /// holds this message's signature, compared in constant time.
    pub fn verifies(&self, id: &str, timestamp: i64, body: &[u8], signatures: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.mac(id, timestamp, body);
        signatures
            .split_whitespace()
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| STANDARD.decode(s).ok())
            .any(|got| bool::from(got.as_slice().ct_eq(&want)))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().to_vec()
    }
}

/// Where webhooks may go: `--webhook-allow` entries, each a host
/// (`hooks.example.com`), a domain's subdomains (`*.example.com`), or
/// either with a port (`127.0.0.1:9000`). Nothing is allowed by default.
#[derive(Debug, Clone, Default)]
pub struct Allow {
    entries: Vec<String>,
    private: bool,
}

impl Allow {
    pub fn new(entries: impl IntoIterator<Item = String>) -> Self {
        Allow {
            entries: entries
                .into_iter()
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
            private: false,
        }
    }

    /// Check a client's `webhook_url`: an absolute `http`/`https` URL with
    /// no credentials, to a host (and port) an entry allows. The error says
    /// why, for a 400 naming `webhook_url`.
    pub fn check(&self, url: &str) -> Result<axum::http::Uri, String> {
        let uri: axum::http::Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}): expected http(s)://host/path"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err("only http and https URLs are called".into()),
        }
        let authority = uri
            .authority()
            .ok_or("no host: expected http(s)://host/path")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not accepted".into());
        }
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16();
        if self.entries.iter().any(|e| allows(e, &host, port)) {
            Ok(uri)
        } else {
            Err(format!(
                "the host {host} is not among the gateway's --webhook-allow entries"
            ))
        }
    }
}

/// Whether entry `e` allows `host` (lowercase) at `port`.
/// How far inside a network an address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Public,
    /// Private ranges (RFC 1918, carrier-grade NAT 100.64/10, IPv6 unique
    /// local fc00::/7): another service's address, perhaps the gateway's
    /// own network's.
    Private,
    /// Loopback, link-local (cloud metadata: 169.254.169.254, and AWS's
    /// fd00:ec2::254 is unique-local, so Private), unspecified, multicast,
    /// broadcast: never a webhook receiver's.
    Internal,
}

/// Where `ip` points, with IPv6 forms that carry an IPv4 address (mapped,
/// compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) judged by that address.
pub fn reach(ip: std::net::IpAddr) -> Reach {
    use std::net::{IpAddr, Ipv4Addr};
    let ip = match ip {
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = if let Some(v4) = v6.to_ipv4_mapped() {
                Some(v4)
            } else if seg[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                v6.to_ipv4() // IPv4-compatible ::a.b.c.d
            } else if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else if seg[0] == 0x2002 {
                let o = v6.octets();
                Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
            } else {
                None
            };
            embedded.map_or(ip, IpAddr::V4)
        }
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
            {
                Reach::Internal
            } else if v4.is_private() || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64) {
                Reach::Private
            } else {
                Reach::Public
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
            {
                Reach::Internal
            } else if (v6.segments()[0] & 0xfe00) == 0xfc00 {
                Reach::Private
            } else {
                Reach::Public
            }
        }
    }
}

impl Allow {
    /// Whether a listed `host` may be reached at `ip`, the address it
    /// resolves to when the webhook is sent (checked again at every try, so
    /// a name re-pointed at an inside address is not followed): public
    /// addresses always; private ones with `--webhook-allow-private`;
    /// anything when the operator listed that very address.
    pub fn address_ok(&self, host: &str, ip: std::net::IpAddr) -> bool {
        let listed_literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|h| h == ip);
        listed_literal
            || match reach(ip) {
                Reach::Public => true,
                Reach::Private => self.private,
                Reach::Internal => false,
            }
    }

    /// Let listed names resolve to private addresses (receivers inside the
    /// gateway's own network).
    pub fn with_private(mut self, private: bool) -> Self {
        self.private = private;
        self
    }
}

fn allows(e: &str, host: &str, port: Option<u16>) -> bool {
    // An entry's port, when it has one, must match; `[v6]:port` keeps its
    // brackets as the URI's host does.
    let (name, want_port) = match e.rsplit_once(':') {
        Some((n, p))
            if !n.is_empty() && !p.contains(']') && (!n.contains(':') || n.ends_with(']')) =>
        {
            (n, p.parse::<u16>().ok())
        }
        _ => (e, None),
    };
    if want_port.is_some() && want_port != port {
        return false;
    }
    match name.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => host == name,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The specification's own example (its libraries' test vector).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn signatures_match_the_specifications_example() {
        let s = Secret::parse(SECRET).unwrap();
        assert_eq!(
            s.sign(ID, TIMESTAMP, BODY),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let [id, ts, sig] = s.headers(ID, TIMESTAMP, BODY);
        assert_eq!((id.0, id.1.as_str()), ("webhook-id", ID));
        assert_eq!((ts.0, ts.1.as_str()), ("webhook-timestamp", "1614265330"));
        assert_eq!(sig.0, "webhook-signature");
        // Several signatures in the header (a rotated secret): any one.
        assert!(s.verifies(ID, TIMESTAMP, BODY, &format!("v1,AAAA {}", sig.1)));
        assert!(!s.verifies(ID, TIMESTAMP + 1, BODY, &sig.1));
        assert!(!s.verifies(ID, TIMESTAMP, b"{}", &sig.1));
        assert!(!s.verifies(ID, TIMESTAMP, BODY, "v2,whatever"));
    }

    #[test]
    fn resolved_addresses_are_checked_again() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let strict = Allow::new([]);
        let inside = Allow::new([]).with_private(true);
        assert!(strict.address_ok("hooks.example.com", ip("93.184.216.34")));
        assert!(strict.address_ok("hooks.example.com", ip("2606:4700::1111")));
        for private in [
            "10.0.0.7",
            "192.168.1.2",
            "172.16.0.1",
            "100.100.100.200",
            "fd00:ec2::254",
        ] {
            assert!(
                !strict.address_ok("hooks.example.com", ip(private)),
                "{private}"
            );
            assert!(
                inside.address_ok("hooks.example.com", ip(private)),
                "{private}"
            );
        }
        for internal in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(
                !strict.address_ok("hooks.example.com", ip(internal)),
                "{internal}"
            );
            assert!(
                !inside.address_ok("hooks.example.com", ip(internal)),
                "{internal}"
            );
        }
        assert!(strict.address_ok("127.0.0.1", ip("127.0.0.1")));
        assert!(strict.address_ok("[::1]", ip("::1")));
    }

    #[test]
    fn secrets_are_checked() {
        let bare = SECRET.strip_prefix(PREFIX).unwrap();
        assert!(Secret::parse(&format!("  {bare}\n")).is_ok());
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=")
            .unwrap_err()
            .contains("5 bytes"));
        assert_eq!(format!("{:?}", Secret::parse(SECRET).unwrap()), "Secret(…)");
    }

    #[test]
    fn webhooks_go_only_where_the_operator_allows() {
        let allow = Allow::new(
            [
                "hooks.example.com",
                "*.corp.example",
                "127.0.0.1:9000",
                "[::1]:8080",
            ]
            .map(String::from),
        );
        for ok in [
            "https://hooks.example.com/done",
            "http://HOOKS.example.com:8443/x?y=1",
            "https://a.corp.example/",
            "https://b.a.corp.example/",
            "http://127.0.0.1:9000/hook",
            "http://[::1]:8080/hook",
        ] {
            assert!(allow.check(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("ftp://hooks.example.com/", "http and https"),
            ("/relative", "http and https"),
            ("https://user:pw@hooks.example.com/", "credentials"),
            ("https://evil.example.com/", "not among"),
            ("https://corp.example/", "not among"),
            ("https://xcorp.example/", "not among"),
            ("http://127.0.0.1:9001/", "not among"),
            ("http://127.0.0.1/", "not among"),
            ("http://169.254.169.254/latest/meta-data", "not among"),
            ("http://[::1]:9000/", "not among"),
        ] {
            let e = allow.check(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(Allow::default()
            .check("https://hooks.example.com/")
            .is_err());
    }
}
