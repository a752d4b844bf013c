//! The three model services `sdctl up` starts, and how many of each.

pub use sd_proto::Stage;

/// The gateway flag that takes a stage's comma-separated URLs.
pub fn gateway_flag(stage: Stage) -> String {
    format!("--{stage}")
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
    fn the_gateway_flags_are_the_gateways() {
        let flags: Vec<String> = Stage::ALL.into_iter().map(gateway_flag).collect();
        assert_eq!(flags, ["--text-encoder", "--denoiser", "--autoencoder"]);
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
