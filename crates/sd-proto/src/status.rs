//! Errors as they cross hops: structured details in tonic's rich error model
//! (`google.rpc.BadRequest` for invalid fields, `google.rpc.ErrorInfo` with
//! a reason defined here for conditions a caller acts on), and short
//! messages that quote at most a few dozen bytes of any input.
//!
//! Both sides of every hop use these, so a reason is spelled once.

use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use tonic_types::FieldViolation;

/// The `ErrorInfo.domain` of every reason below.
pub const DOMAIN: &str = "sdserve";

/// Conditions a caller acts on, carried as `ErrorInfo.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The denoiser has no embedding under the id it was given (evicted, or
    /// another replica): send the tensor again. Metadata: `id`, `field`.
    EmbeddingMiss,
    /// A message did not decode (truncated, a string not UTF-8): the
    /// sender's fault — the client's when a server says it, the server's
    /// when a client's codec says it of a reply.
    Undecodable,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::EmbeddingMiss => "EMBEDDING_MISS",
            Reason::Undecodable => "UNDECODABLE",
        }
    }
}

/// Bytes of an input quoted in a message, at most.
pub const QUOTE_BYTES: usize = 40;

/// An input as a message may show it: the first [`QUOTE_BYTES`] bytes
/// (on a character boundary), escaped, and the full length when cut.
pub struct Quoted<'a>(&'a str);

/// Quote `s` for a message (see [`Quoted`]).
pub fn quote(s: &str) -> Quoted<'_> {
    Quoted(s)
}

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= QUOTE_BYTES {
            return write!(f, "{s:?}");
        }
        write!(
            f,
            "{:?}… ({} bytes)",
            prefix_within(s, QUOTE_BYTES),
            s.len()
        )
    }
}

/// INVALID_ARGUMENT naming `field`: the message reads `field: description`
/// and the details carry a `BadRequest` with one field violation, so a
/// client can tell which field without parsing text.
pub fn invalid_argument(field: &str, description: impl fmt::Display) -> Status {
    let description = description.to_string();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// The field violations a status carries (empty when none).
pub fn field_violations(s: &Status) -> Vec<FieldViolation> {
    s.get_details_bad_request()
        .map(|b| b.field_violations)
        .unwrap_or_default()
}

/// Longest metadata value an `ErrorInfo` carries (longer ones are cut).
pub const MAX_METADATA_BYTES: usize = 128;

/// `code` with an `ErrorInfo` of reason `reason` and `metadata` (values cut
/// to [`MAX_METADATA_BYTES`]).
pub fn with_reason(
    code: Code,
    reason: Reason,
    message: impl Into<String>,
    metadata: &[(&str, &str)],
) -> Status {
    let metadata: std::collections::HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                prefix_within(v, MAX_METADATA_BYTES).to_string(),
            )
        })
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason.as_str(), DOMAIN, metadata),
    )
}

/// The longest prefix of `s` of at most `max` bytes, on a character boundary.
pub fn prefix_within(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The denoiser has no embedding `id` for `field`: the caller resends it.
pub fn embedding_miss(field: &str, id: &str) -> Status {
    with_reason(
        Code::FailedPrecondition,
        Reason::EmbeddingMiss,
        format!(
            "{field}: embedding id {} is not cached; resend it",
            quote(id)
        ),
        &[("id", id), ("field", field)],
    )
}

/// A message that did not decode: INVALID_ARGUMENT, reason UNDECODABLE.
pub fn undecodable(detail: &str) -> Status {
    with_reason(
        Code::InvalidArgument,
        Reason::Undecodable,
        format!(
            "the message could not be decoded: {}",
            prefix_within(detail, 160)
        ),
        &[],
    )
}

/// The reason a status carries, when it is one of ours.
pub fn reason(s: &Status) -> Option<Reason> {
    let info = s.get_details_error_info()?;
    if info.domain != DOMAIN {
        return None;
    }
    [Reason::EmbeddingMiss, Reason::Undecodable]
        .into_iter()
        .find(|r| r.as_str() == info.reason)
}

/// Whether `s` asks for an embedding again.
pub fn is_embedding_miss(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && reason(s) == Some(Reason::EmbeddingMiss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short_and_cut_on_a_character_boundary() {
        assert_eq!(quote("euler").to_string(), "\"euler\"");
        let long = "é".repeat(1 << 19); // 1 MiB
        let q = quote(&long).to_string();
        assert!(q.len() < 80, "{q}");
        assert!(q.ends_with("(1048576 bytes)"), "{q}");
    }

    #[test]
    fn invalid_argument_names_the_field_in_the_details() {
        let s = invalid_argument("width", "7 given, a multiple of 8 allowed");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "width: 7 given, a multiple of 8 allowed");
        let v = field_violations(&s);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "width");
        assert_eq!(v[0].description, "7 given, a multiple of 8 allowed");
        assert!(field_violations(&Status::invalid_argument("width: 7")).is_empty());
    }

    #[test]
    fn an_embedding_miss_is_known_by_its_reason_not_its_text() {
        let s = embedding_miss("cond", "42");
        assert!(is_embedding_miss(&s));
        assert_eq!(reason(&s), Some(Reason::EmbeddingMiss));
        // The same code and words without the ErrorInfo are not a miss.
        let lookalike = Status::failed_precondition(s.message().to_string());
        assert!(!is_embedding_miss(&lookalike));
        // Through the wire form (grpc-status-details-bin) and back.
        let mut headers = tonic::codegen::http::HeaderMap::new();
        s.add_header(&mut headers).unwrap();
        let back = Status::from_header_map(&headers).unwrap();
        assert!(is_embedding_miss(&back));
        let info = back.get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("id").map(String::as_str), Some("42"));
    }

    #[test]
    fn a_huge_id_is_cut_in_the_details_too() {
        let s = embedding_miss("cond", &"i".repeat(1 << 20));
        assert!(s.message().len() < 200, "{}", s.message().len());
        assert!(
            s.details().len() < 400,
            "{} detail bytes",
            s.details().len()
        );
        assert!(is_embedding_miss(&s));
    }

    #[test]
    fn an_undecodable_message_says_so_by_its_reason() {
        let s = undecodable(&"x".repeat(10_000));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(reason(&s), Some(Reason::Undecodable));
        assert!(s.message().len() < 250);
    }
}
