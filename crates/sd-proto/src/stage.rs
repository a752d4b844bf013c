//! The protocol's three model services, named once: the gateway's pools and
//! errors, `sdctl up` and the services' health all use these names.

use std::fmt;
use std::str::FromStr;

use crate::v1::{autoencoder_server, denoiser_server, text_encoder_server};

/// One model service, in the order a stack starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    TextEncoder,
    Denoiser,
    Autoencoder,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::TextEncoder, Stage::Denoiser, Stage::Autoencoder];

    /// Its name in flags, metrics, logs and messages (`text-encoder`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Stage::TextEncoder => "text-encoder",
            Stage::Denoiser => "denoiser",
            Stage::Autoencoder => "autoencoder",
        }
    }

    /// Its server binary (`sd-text-encoder`, …).
    pub const fn binary(self) -> &'static str {
        match self {
            Stage::TextEncoder => "sd-text-encoder",
            Stage::Denoiser => "sd-denoiser",
            Stage::Autoencoder => "sd-autoencoder",
        }
    }

    /// Its gRPC service (`sd.v1.TextEncoder`, …), as health reports it.
    pub const fn grpc_service(self) -> &'static str {
        match self {
            Stage::TextEncoder => text_encoder_server::SERVICE_NAME,
            Stage::Denoiser => denoiser_server::SERVICE_NAME,
            Stage::Autoencoder => autoencoder_server::SERVICE_NAME,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is none of the stages'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStage(String);

impl fmt::Display for UnknownStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown stage `{}` ({})",
            self.0,
            Stage::ALL.map(Stage::name).join(", ")
        )
    }
}

impl std::error::Error for UnknownStage {}

impl FromStr for Stage {
    type Err = UnknownStage;

    fn from_str(s: &str) -> Result<Self, UnknownStage> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.name() == s)
            .ok_or_else(|| UnknownStage(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_follow_one_pattern() {
        for stage in Stage::ALL {
            assert_eq!(stage.name().parse::<Stage>(), Ok(stage));
            assert_eq!(stage.binary(), format!("sd-{stage}"));
            assert!(stage.grpc_service().starts_with("sd.v1."));
        }
        assert_eq!(
            "vae".parse::<Stage>().unwrap_err().to_string(),
            "unknown stage `vae` (text-encoder, denoiser, autoencoder)"
        );
    }
}
