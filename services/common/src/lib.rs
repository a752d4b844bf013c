//! Shared by the text-encoder, denoiser and autoencoder services.

mod args;
pub mod compute;
pub mod control;
pub mod error;
pub mod family;
pub mod folder;
mod identity;
pub mod ip;
pub mod lora;
pub mod machine;
mod serve;
pub mod step;
pub mod text;
pub mod threads;
pub mod ti;
mod wire;
mod worker;

pub use args::ModelArgs;
pub use error::ServiceError;
pub use identity::model_id;
pub use serve::{answer, handle, maybe_timed_load, rpc_span, serve_model, timed_load};
pub use wire::{dtype_of, finite, from_wire, to_wire};
pub use worker::{Timings, Worker};
