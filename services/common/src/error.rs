//! What the model services refuse or fail at, and the one map from it to
//! gRPC statuses.
//!
//! Clients get short messages in our own words: an input is quoted by at
//! most a few dozen bytes (`sd_proto::status::quote`), and a dependency's
//! text — libtorch's errors carry C++ backtraces, absolute paths and load
//! addresses — is logged (in the caller's span, so with its trace id) and
//! never sent.

use std::sync::Arc;

use sd_models::ModelError;
use tonic::Status;

/// Longest message a service sends, in bytes (messages are built from our
/// own words and quoted inputs, so this only guards against a slip).
pub const MAX_MESSAGE_BYTES: usize = 256;

/// Everything a model service answers with instead of a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// A request field the service cannot take: INVALID_ARGUMENT with a
    /// `BadRequest` field violation naming `field`.
    #[error("{field}: {description}")]
    InvalidField { field: String, description: String },
    /// The denoiser holds no embedding under `id`: FAILED_PRECONDITION with
    /// the EMBEDDING_MISS reason, so the caller resends the tensor.
    #[error("{field}: embedding id {} is not cached", sd_proto::status::quote(id))]
    EmbeddingMiss { field: String, id: String },
    /// The request would hold more than a bound allows (a stream's
    /// embeddings): RESOURCE_EXHAUSTED naming `field`.
    #[error("{field}: {description}")]
    Exhausted { field: String, description: String },
    /// Refused before any work by sd-runtime's admission (queue full:
    /// RESOURCE_EXHAUSTED), drain (UNAVAILABLE) or deadline; its code stands.
    #[error(transparent)]
    Refused(#[from] sd_runtime::Refusal),
    /// The UNet workers have stopped (the service is shutting down).
    #[error("the model workers stopped")]
    Stopped,
    /// A model call failed (shared: one batched forward fails for every
    /// call in it).
    #[error(transparent)]
    Model(Arc<ModelError>),
    /// The task running model work panicked or was cancelled; the panic
    /// text may be libtorch's.
    #[error("model task failed: {0}")]
    Task(String),
    /// One of our own invariants broke (a poisoned lock, a dropped reply).
    #[error("{0}")]
    Internal(&'static str),
}

impl ServiceError {
    /// An invalid `field`, described in our words (quote inputs with
    /// `sd_proto::status::quote`).
    pub fn invalid(field: impl Into<String>, description: impl std::fmt::Display) -> Self {
        ServiceError::InvalidField {
            field: field.into(),
            description: description.to_string(),
        }
    }

    /// A model error for an input the caller named `field`: the model's
    /// input refusals become that field's violation.
    pub fn model_input(field: &str, e: ModelError) -> Self {
        match e {
            ModelError::Input(m) => ServiceError::invalid(field, m),
            e => e.into(),
        }
    }
}

impl From<ModelError> for ServiceError {
    fn from(e: ModelError) -> Self {
        ServiceError::Model(Arc::new(e))
    }
}

impl From<tch::TchError> for ServiceError {
    fn from(e: tch::TchError) -> Self {
        ModelError::from(e).into()
    }
}

impl From<tokio::task::JoinError> for ServiceError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServiceError::Task(e.to_string())
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        match e {
            ServiceError::InvalidField { field, description } => {
                sd_proto::status::invalid_argument(&field, bounded(&description, &field))
            }
            ServiceError::EmbeddingMiss { field, id } => {
                sd_proto::status::embedding_miss(&field, &id)
            }
            ServiceError::Exhausted { field, description } => {
                Status::resource_exhausted(format!("{field}: {}", bounded(&description, &field)))
            }
            ServiceError::Refused(r) => r.into(),
            ServiceError::Stopped => Status::unavailable("the model workers stopped"),
            ServiceError::Model(e) => model_status(&e),
            ServiceError::Task(text) => {
                tracing::error!(error = %text, "model task failed");
                Status::internal("model task failed (logged)")
            }
            ServiceError::Internal(what) => {
                tracing::error!(error = what, "internal error");
                Status::internal(what)
            }
        }
    }
}

/// Model errors as statuses: input refusals in our words; libtorch's
/// failures and the model files' problems (they name server paths) logged
/// and answered briefly.
fn model_status(e: &ModelError) -> Status {
    match e {
        ModelError::Input(m) => Status::invalid_argument(bounded(m, "")),
        ModelError::Torch(m) => {
            tracing::error!(error = %m, "model failure");
            Status::internal("model failure (logged)")
        }
        ModelError::Device(m) => {
            tracing::error!(error = %m, "device unusable");
            Status::failed_precondition("the model's device is unusable (logged)")
        }
        ModelError::Io { .. }
        | ModelError::MissingFile { .. }
        | ModelError::Pickle { .. }
        | ModelError::Config { .. }
        | ModelError::Unsupported { .. }
        | ModelError::Safetensors { .. }
        | ModelError::MissingTensor { .. }
        | ModelError::Shape { .. }
        | ModelError::Dtype { .. }
        | ModelError::Tokenizer { .. } => {
            tracing::error!(error = %e, "model files unusable");
            Status::failed_precondition("the model's files are unusable (logged)")
        }
    }
}

/// `text` cut so that `prefix: text` stays within [`MAX_MESSAGE_BYTES`].
fn bounded(text: &str, prefix: &str) -> String {
    let room = MAX_MESSAGE_BYTES.saturating_sub(prefix.len() + 2);
    if text.len() <= room {
        return text.to_string();
    }
    let cut = sd_proto::status::prefix_within(text, room.saturating_sub('…'.len_utf8()));
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tonic::Code;

    /// A libtorch error as tch reports it: a C++ backtrace with paths.
    const TORCH_TEXT: &str = "Internal torch error: Stride calculation overflowed\n\
        Exception raised from computeStrides at /work/main/.venv/lib/torch/include/c10/core/TensorImpl.h:123\n\
        frame #0: c10::Error::Error(...) + 0x7f3a (0x7f00deadbeef in /work/main/.venv/lib/libc10.so)";

    fn every_variant() -> Vec<(ServiceError, Code)> {
        let mut all = vec![
            (
                ServiceError::invalid("latents", "shape [1, 3], expected 4-d"),
                Code::InvalidArgument,
            ),
            (
                ServiceError::EmbeddingMiss {
                    field: "cond".into(),
                    id: "emb-1".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ServiceError::Refused(sd_runtime::Refusal::Overloaded {
                    what: "test",
                    max_queue: 1,
                }),
                Code::ResourceExhausted,
            ),
            (
                ServiceError::Refused(sd_runtime::Refusal::ShuttingDown),
                Code::Unavailable,
            ),
            (ServiceError::Stopped, Code::Unavailable),
            (
                ServiceError::Exhausted {
                    field: "cond".into(),
                    description: "this stream holds 4 embeddings, at most 4".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                ServiceError::Task(format!("task 7 panicked with message {TORCH_TEXT:?}")),
                Code::Internal,
            ),
            (
                ServiceError::Internal("embedding cache poisoned"),
                Code::Internal,
            ),
        ];
        all.extend(
            every_model_error()
                .into_iter()
                .map(|(e, code)| (ServiceError::from(e), code)),
        );
        all
    }

    fn every_model_error() -> Vec<(ModelError, Code)> {
        let path = PathBuf::from("/srv/models/sd/unet/diffusion_pytorch_model.safetensors");
        vec![
            (
                ModelError::Input("latents must be 4-d".into()),
                Code::InvalidArgument,
            ),
            (ModelError::Torch(TORCH_TEXT.into()), Code::Internal),
            (
                ModelError::Device("cuda:3: no such GPU".into()),
                Code::FailedPrecondition,
            ),
            (
                ModelError::Io {
                    path: path.clone(),
                    source: std::io::Error::other("disk gone"),
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::MissingFile { path: path.clone() },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Pickle { path: path.clone() },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Config {
                    path: path.clone(),
                    message: "bad".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Unsupported {
                    path: path.clone(),
                    message: "bad".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Safetensors {
                    path: path.clone(),
                    message: "bad".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::MissingTensor {
                    path: path.clone(),
                    name: "w".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Shape {
                    path: path.clone(),
                    name: "w".into(),
                    expected: vec![1],
                    actual: vec![2],
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Dtype {
                    path: path.clone(),
                    name: "w".into(),
                    dtype: "Int".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ModelError::Tokenizer {
                    path,
                    message: "bad".into(),
                },
                Code::FailedPrecondition,
            ),
        ]
    }

    #[test]
    fn every_error_maps_to_its_code() {
        for (e, code) in every_variant() {
            let shown = format!("{e:?}");
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{shown} → {s:?}");
            assert!(s.message().len() <= MAX_MESSAGE_BYTES, "{shown}: {s:?}");
        }
    }

    #[test]
    fn no_dependency_text_or_server_path_reaches_the_client() {
        for (e, _) in every_variant() {
            let shown = format!("{e:?}");
            let s = Status::from(e);
            for leak in [
                "torch",
                "frame #",
                "0x7f",
                "/srv/",
                "/work/",
                ".so",
                "disk gone",
            ] {
                assert!(
                    !s.message().contains(leak),
                    "{shown} leaked {leak:?}: {s:?}"
                );
            }
        }
        // The case, straight to libtorch: no elements, yet strides
        // that overflow (`from_wire` checks the shape first).
        let tch_error = tch::Tensor::f_from_data_size(&[], &[1, 4, 0, 1 << 62], tch::Kind::Float)
            .expect_err("libtorch refuses the shape");
        assert!(tch_error.to_string().contains("torch"), "{tch_error}");
        let s = Status::from(ServiceError::from(tch_error));
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "model failure (logged)");
    }

    #[test]
    fn invalid_fields_are_named_in_the_details() {
        let s = Status::from(ServiceError::invalid("timesteps", "3 given, 1 or 2 needed"));
        assert_eq!(s.message(), "timesteps: 3 given, 1 or 2 needed");
        let v = sd_proto::status::field_violations(&s);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "timesteps");
        // The model's own input refusals, for an input the caller named.
        let s = Status::from(ServiceError::model_input(
            "prompts",
            ModelError::Input("tokenizing the prompt: bad".into()),
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(sd_proto::status::field_violations(&s)[0].field, "prompts");
    }

    #[test]
    fn an_embedding_miss_carries_its_reason_and_a_short_id() {
        let id = "x".repeat(1 << 20);
        let s = Status::from(ServiceError::EmbeddingMiss {
            field: "cond".into(),
            id: "emb-42".into(),
        });
        assert!(sd_proto::status::is_embedding_miss(&s));
        let long = ServiceError::EmbeddingMiss {
            field: "uncond".into(),
            id,
        };
        assert!(long.to_string().len() < 100, "{long}");
    }

    #[test]
    fn long_descriptions_are_cut() {
        let s = Status::from(ServiceError::invalid("prompts", "é".repeat(10_000)));
        assert!(
            s.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            s.message().len()
        );
        assert!(s.message().starts_with("prompts: é"));
        assert!(s.message().ends_with('…'));
        let s = Status::from(ServiceError::from(ModelError::Input("x".repeat(10_000))));
        assert!(s.message().len() <= MAX_MESSAGE_BYTES);
    }
}
