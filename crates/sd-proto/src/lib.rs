//! The `sd.v1` protocol: generated messages, clients and servers, and the
//! tensor wire format (raw little-endian bytes with shape and dtype).
//!
//! This crate does not link libtorch: the gateway uses it as it is, the model
//! services convert to tch tensors on their side.

pub mod codec;
pub mod cost;
pub mod family;
pub mod health;
pub mod lora;
pub mod stage;
pub mod status;
pub mod wire;

/// Generated code for `package sd.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("sd.v1");
}

/// Encoded `FileDescriptorSet` of `sd.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sd_v1_descriptor");

/// The environment variable that carries the internal token the model
/// services require and the gateway sends (`authorization: Bearer TOKEN`;
/// sd-runtime's `internal` module checks and sends it).
pub const INTERNAL_TOKEN_ENV: &str = "SD_INTERNAL_TOKEN";
/// The environment variable naming a file that holds the internal token
/// (the `--internal-token-file` flag's).
pub const INTERNAL_TOKEN_FILE_ENV: &str = "SD_INTERNAL_TOKEN_FILE";

pub use family::Family;
pub use stage::Stage;
pub use wire::{HostTensor, WireError};
