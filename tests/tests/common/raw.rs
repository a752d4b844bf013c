//! Raw HTTP/1.1 exchanges with the gateway's HTTP door (no client
//! library: the tests see exactly the bytes that go and come).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// One raw HTTP/1.1 exchange: (status, JSON body).
pub fn exchange(base: &str, raw: &[u8]) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(host_port(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

pub fn post(base: &str, path: &str, headers: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
        host_port(base),
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    exchange(base, &raw)
}

pub fn post_json(base: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    post(
        base,
        path,
        "Content-Type: application/json\r\n",
        body.as_bytes(),
    )
}
