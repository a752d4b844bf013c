//! Deadlines across hops: the client's `grpc-timeout` becomes a deadline in
//! the gateway, and every internal call carries what is left of it.

use std::time::Duration;

use crate::error::Refusal;
use tokio::time::Instant;

/// Parse a `grpc-timeout` header value: digits then one of H M S m u n.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When a request must be done by, if its client said.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    pub fn none() -> Self {
        Deadline(None)
    }

    pub fn after(d: Duration) -> Self {
        Deadline(Some(Instant::now() + d))
    }

    pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Self {
        let t = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        // Finish a little early, so the caller hears our DEADLINE_EXCEEDED
        // (naming what ran out) rather than its transport's timeout.
        Deadline(t.map(|d| Instant::now() + d - (d / 10).min(Duration::from_millis(50))))
    }

    /// Time left, or [`Refusal::DeadlinePassed`] when none is.
    pub fn remaining(&self) -> Result<Option<Duration>, Refusal> {
        match self.0 {
            None => Ok(None),
            Some(at) => {
                let now = Instant::now();
                if now >= at {
                    Err(Refusal::DeadlinePassed)
                } else {
                    Ok(Some(at - now))
                }
            }
        }
    }

    /// Wrap an outgoing request so it carries the time left.
    pub fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Refusal> {
        let mut r = tonic::Request::new(msg);
        if let Some(left) = self.remaining()? {
            r.set_timeout(left);
        }
        Ok(r)
    }

    pub fn instant(&self) -> Option<Instant> {
        self.0
    }

    /// Whether the deadline has passed, or is within `slack` of passing.
    /// (A model service that runs out of the time passed on answers a
    /// little before the gateway's own clock says so.)
    pub fn passed_within(&self, slack: Duration) -> bool {
        self.0.is_some_and(|at| Instant::now() + slack >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12X"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
