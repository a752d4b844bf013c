//! The sdserve gateway: the public `sd.v1.Generation` API. It validates a
//! request, encodes the prompts (through a cache of prompt embeddings), draws
//! the seeded noise, calls the denoiser once per step, applies the scheduler
//! and has the autoencoder decode — all in pure Rust; the networks live in
//! the model services. The same service answers HTTP too (`http`: the
//! OpenAI Images API and an AUTOMATIC1111 subset).

pub mod auth;
pub mod backends;
pub mod blocking;
pub mod canny;
pub mod control;
pub mod error;
pub mod facts;
pub mod hires;
pub mod http;
pub mod images;
pub mod infotext;
pub mod ip;
pub mod limits;
pub mod mask;
pub mod micro;
pub mod pipeline;
pub mod plan;
pub mod pool;
pub mod prompt_cache;
pub mod queue;
pub mod reference;
pub mod resample;
pub mod service;
pub mod stages;
pub mod webhook;
