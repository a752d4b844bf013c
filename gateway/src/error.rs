//! Everything the gateway refuses or fails at, with its one map to gRPC
//! codes. A model service's own answer keeps its status (code, message and
//! details) across the hop; anything a model service sends that the
//! gateway cannot use is INTERNAL, never the client's fault.

use sd_proto::status::{invalid_argument, is_embedding_miss, quote, reason, Reason};
pub use sd_proto::Stage;
use sd_runtime::Refusal;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field outside what is allowed.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// API keys are required and the request brought none or a wrong one.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The request names a model this gateway does not serve.
    #[error("model: {requested} is not served here (this gateway serves {served})")]
    UnknownModel { requested: String, served: String },
    /// Admission, draining or the deadline refused the work.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The client's deadline passed; `when` says during what.
    #[error("the client's deadline passed {when}")]
    DeadlinePassed { when: String },
    /// The client went away (cancelled, disconnected, closed its stream).
    #[error("client went away")]
    ClientGone,
    /// A model service answered with an error of its own.
    #[error("{stage}: {}", .status.message())]
    Stage { stage: Stage, status: Status },
    /// No replica of a stage could take the call.
    #[error("{stage}: {reason}")]
    Unavailable { stage: Stage, reason: String },
    /// A model service refused the gateway's internal token (or its lack):
    /// a deployment error, never the client's.
    #[error("{stage} refused the gateway's internal token ({message}): give the gateway the model services' token (--internal-token-file or SD_INTERNAL_TOKEN)")]
    Credentials { stage: Stage, message: String },
    /// A model service answered something the gateway cannot use.
    #[error("{stage} sent {what}")]
    BadReply { stage: Stage, what: String },
    /// Work the gateway does itself failed (a task, an image encoder).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &'static str, message: impl std::fmt::Display) -> Self {
        Error::Invalid {
            field,
            message: message.to_string(),
        }
    }

    /// The model named by a request, quoted (it is the client's input).
    pub fn unknown_model(requested: &str, served: &str) -> Self {
        Error::UnknownModel {
            requested: quote(requested).to_string(),
            served: served.to_string(),
        }
    }

    /// A model service's failed call: its own status, kept whole — unless a
    /// message between the gateway and the service did not decode (either
    /// side's codec says so by its reason), which is no fault of the
    /// client's: INTERNAL.
    pub fn from_stage(stage: Stage, status: Status) -> Self {
        if status.code() == tonic::Code::Unauthenticated {
            Error::Credentials {
                stage,
                message: status.message().to_string(),
            }
        } else if reason(&status) == Some(Reason::Undecodable) {
            Error::Internal(format!("{stage}: {}", status.message()))
        } else {
            Error::Stage { stage, status }
        }
    }

    pub fn bad_reply(stage: Stage, what: impl std::fmt::Display) -> Self {
        Error::BadReply {
            stage,
            what: what.to_string(),
        }
    }

    /// Whether a model service refused the gateway's internal token.
    pub fn is_credentials(&self) -> bool {
        matches!(self, Error::Credentials { .. })
    }

    /// Whether this is the denoiser asking for the embeddings again.
    pub fn is_embedding_miss(&self) -> bool {
        matches!(self, Error::Stage { status, .. } if is_embedding_miss(status))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::Invalid { field, message } => invalid_argument(field, message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            // A field of the request names what is not served: the
            // request is wrong (with the field, as every invalid one).
            Error::UnknownModel { .. } => invalid_argument("model", message),
            Error::Refused(r) => r.into(),
            Error::DeadlinePassed { .. } => Status::deadline_exceeded(message),
            Error::ClientGone => Status::cancelled(message),
            // The service's own status, details and all.
            Error::Stage { status, .. } => status,
            Error::Unavailable { .. } => Status::unavailable(message),
            Error::Credentials { .. } | Error::BadReply { .. } | Error::Internal(_) => {
                Status::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_proto::status::field_violations;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code() {
        let cases = [
            (Error::invalid("width", "7 given"), Code::InvalidArgument),
            (Error::Unauthenticated("no key"), Code::Unauthenticated),
            (Error::unknown_model("x", "tiny"), Code::InvalidArgument),
            (Error::Refused(Refusal::ShuttingDown), Code::Unavailable),
            (
                Error::DeadlinePassed {
                    when: "while queued".into(),
                },
                Code::DeadlineExceeded,
            ),
            (Error::ClientGone, Code::Cancelled),
            (
                Error::Stage {
                    stage: Stage::Denoiser,
                    status: Status::resource_exhausted("queue full"),
                },
                Code::ResourceExhausted,
            ),
            (
                Error::Unavailable {
                    stage: Stage::Autoencoder,
                    reason: "no replicas".into(),
                },
                Code::Unavailable,
            ),
            (
                Error::bad_reply(Stage::TextEncoder, "no embeddings"),
                Code::Internal,
            ),
            (Error::Internal("png".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn invalid_fields_are_named_in_the_details() {
        let s = Status::from(Error::invalid("steps", "0 given"));
        assert_eq!(s.message(), "steps: 0 given");
        assert_eq!(field_violations(&s)[0].field, "steps");
    }

    #[test]
    fn a_model_services_status_crosses_the_hop_whole() {
        let miss = sd_proto::status::embedding_miss("cond", "7");
        let e = Error::Stage {
            stage: Stage::Denoiser,
            status: miss,
        };
        assert!(e.is_embedding_miss());
        let s = Status::from(e);
        assert!(is_embedding_miss(&s));
    }

    #[test]
    fn a_message_that_did_not_decode_between_hops_is_internal() {
        let e = Error::from_stage(Stage::Denoiser, sd_proto::status::undecodable("truncated"));
        assert_eq!(Status::from(e).code(), Code::Internal);
        let e = Error::from_stage(
            Stage::Denoiser,
            sd_proto::status::invalid_argument("x", "y"),
        );
        assert_eq!(Status::from(e).code(), Code::InvalidArgument);
    }

    #[test]
    fn a_refused_internal_token_is_internal_not_the_clients() {
        let e = Error::from_stage(
            Stage::Denoiser,
            Status::unauthenticated("invalid internal token"),
        );
        assert!(e.is_credentials());
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("SD_INTERNAL_TOKEN"), "{}", s.message());
    }

    #[test]
    fn a_huge_model_name_is_not_echoed() {
        let s = Status::from(Error::unknown_model(&"m".repeat(1 << 20), "tiny"));
        assert!(s.message().len() < 200, "{}", s.message().len());
    }
}
