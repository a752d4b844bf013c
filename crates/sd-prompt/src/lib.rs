//! AUTOMATIC1111's prompt syntax (1.10), shared by the gateway (which checks
//! what it can before any work) and the text encoder (which encodes it):
//! [`attention::parse`] splits a prompt into weighted fragments, and
//! [`chunks::chunks`] lays their tokens out in 77-token chunks with a weight
//! per token.

pub mod attention;
pub mod chunks;
pub mod networks;

pub use attention::{parse, unsupported, unweighted, Emphasis, Fragment};
pub use chunks::{chunks, Chunk, Vocab};
pub use networks::{take_loras, LoraTag};
