//! The three model services `sdctl up` starts, and how many of each.

use std::fmt;
use std::str::FromStr;

/// One model service of the stack, in the order they are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    TextEncoder,
    Denoiser,
    Autoencoder,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::TextEncoder, Stage::Denoiser, Stage::Autoencoder];

    /// Its name on the command line (`--replicas denoiser=2`) and in messages.
    pub fn cli_name(self) -> &'static str {
        match self {
            Stage::TextEncoder => "text-encoder",
            Stage::Denoiser => "denoiser",
            Stage::Autoencoder => "autoencoder",
        }
    }

    /// The server binary, next to sdctl.
    pub fn binary(self) -> &'static str {
        match self {
            Stage::TextEncoder => "sd-text-encoder",
            Stage::Denoiser => "sd-denoiser",
            Stage::Autoencoder => "sd-autoencoder",
        }
    }

    /// The gateway flag that takes this stage's comma-separated URLs.
    pub fn gateway_flag(self) -> &'static str {
        match self {
            Stage::TextEncoder => "--text-encoder",
            Stage::Denoiser => "--denoiser",
            Stage::Autoencoder => "--autoencoder",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for Stage {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.cli_name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown stage `{s}` ({})",
                    Stage::ALL.map(Stage::cli_name).join(", ")
                )
            })
    }
}

/// Replicas per stage (1 each unless `--replicas` says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    text_encoder: usize,
    denoiser: usize,
    autoencoder: usize,
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas {
            text_encoder: 1,
            denoiser: 1,
            autoencoder: 1,
        }
    }
}

impl Replicas {
    const MAX: usize = 16;

    /// `stage=count` pairs, each count in 1..=16; a later pair for the same
    /// stage wins.
    pub fn parse(specs: &[String]) -> anyhow::Result<Self> {
        let mut replicas = Replicas::default();
        for spec in specs {
            let (stage, n) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--replicas {spec}: expected stage=count"))?;
            let n: usize = n
                .parse()
                .map_err(|_| anyhow::anyhow!("--replicas {spec}: count must be a number"))?;
            if !(1..=Self::MAX).contains(&n) {
                anyhow::bail!("--replicas {spec}: count must be 1..={}", Self::MAX);
            }
            let stage: Stage = stage
                .parse()
                .map_err(|e| anyhow::anyhow!("--replicas: {e}"))?;
            *replicas.of_mut(stage) = n;
        }
        Ok(replicas)
    }

    pub fn of(&self, stage: Stage) -> usize {
        match stage {
            Stage::TextEncoder => self.text_encoder,
            Stage::Denoiser => self.denoiser,
            Stage::Autoencoder => self.autoencoder,
        }
    }

    fn of_mut(&mut self, stage: Stage) -> &mut usize {
        match stage {
            Stage::TextEncoder => &mut self.text_encoder,
            Stage::Denoiser => &mut self.denoiser,
            Stage::Autoencoder => &mut self.autoencoder,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(specs: &[&str]) -> anyhow::Result<Replicas> {
        Replicas::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn err(specs: &[&str]) -> String {
        match parse(specs) {
            Ok(r) => panic!("{specs:?} parsed as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn names_round_trip_and_are_distinct() {
        for stage in Stage::ALL {
            assert_eq!(stage.cli_name().parse::<Stage>().ok(), Some(stage));
            assert_eq!(stage.binary(), format!("sd-{stage}"));
            assert_eq!(stage.gateway_flag(), format!("--{stage}"));
        }
    }

    #[test]
    fn one_replica_each_unless_given() {
        let r = parse(&[]).expect("empty");
        assert!(Stage::ALL.iter().all(|&s| r.of(s) == 1), "{r:?}");
        let r = parse(&["denoiser=2", "autoencoder=3", "denoiser=4"]).expect("valid");
        assert_eq!(r.of(Stage::TextEncoder), 1);
        assert_eq!(r.of(Stage::Denoiser), 4);
        assert_eq!(r.of(Stage::Autoencoder), 3);
        assert_eq!(
            parse(&["text-encoder=16"])
                .expect("max")
                .of(Stage::TextEncoder),
            16
        );
    }

    #[test]
    fn bad_replica_specs_say_what_is_wrong() {
        assert!(err(&["denoiser"]).contains("expected stage=count"));
        assert!(err(&["denoiser=two"]).contains("count must be a number"));
        assert!(err(&["denoiser=0"]).contains("count must be 1..=16"));
        assert!(err(&["denoiser=17"]).contains("count must be 1..=16"));
        assert_eq!(
            err(&["vae=2"]),
            "--replicas: unknown stage `vae` (text-encoder, denoiser, autoencoder)"
        );
    }
}
