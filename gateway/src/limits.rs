//! Bounds on what one request may ask for: the gateway's flags, and the
//! same numbers as `Limits::default()` — which reads no environment, so
//! tests, fuzz targets and the benchmark see the documented defaults
//! whatever `SD_*` variables are set.

/// Bounds on what one request may ask for.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct Limits {
    /// Smallest image side in pixels.
    #[arg(long, env = "SD_MIN_SIDE", default_value_t = Limits::DEFAULT.min_side)]
    pub min_side: u32,
    /// Largest image side in pixels.
    #[arg(long, env = "SD_MAX_SIDE", default_value_t = Limits::DEFAULT.max_side)]
    pub max_side: u32,
    /// Most denoising steps per request.
    #[arg(long, env = "SD_MAX_STEPS", default_value_t = Limits::DEFAULT.max_steps)]
    pub max_steps: u32,
    /// Most images per request.
    #[arg(long, env = "SD_MAX_IMAGES", default_value_t = Limits::DEFAULT.max_images)]
    pub max_images: u32,
    /// Longest prompt (and negative prompt) in bytes.
    #[arg(long, env = "SD_MAX_PROMPT_BYTES", default_value_t = Limits::DEFAULT.max_prompt_bytes)]
    pub max_prompt_bytes: usize,
    /// Largest init image in bytes.
    #[arg(long, env = "SD_MAX_INIT_IMAGE_BYTES", default_value_t = Limits::DEFAULT.max_init_image_bytes)]
    pub max_init_image_bytes: usize,
    /// Most UNet seconds one request may take, as the denoiser's measured
    /// cost predicts them (images, size, steps and guidance together).
    #[arg(long, env = "SD_MAX_REQUEST_SECONDS", default_value_t = Limits::DEFAULT.max_request_seconds)]
    pub max_request_seconds: f64,
}

impl Limits {
    /// The defaults, one source for the flags and for `Default`.
    pub const DEFAULT: Limits = Limits {
        min_side: 8,
        max_side: 2048,
        max_steps: 150,
        max_images: 8,
        max_prompt_bytes: 4096,
        max_init_image_bytes: 16 << 20,
        max_request_seconds: 600.0,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    #[test]
    fn the_defaults_are_the_documented_numbers() {
        // Whatever SD_* variables the environment holds.
        let d = Limits::default();
        assert_eq!(
            (d.min_side, d.max_side, d.max_steps, d.max_images),
            (8, 2048, 150, 8)
        );
        assert_eq!(
            (d.max_prompt_bytes, d.max_init_image_bytes),
            (4096, 16 << 20)
        );
        assert_eq!(d.max_request_seconds, 600.0);
    }

    #[test]
    fn the_flags_defaults_are_the_default() {
        // clap's declared defaults, without parsing (parsing would read SD_*).
        let cmd = Limits::augment_args(Command::new("limits"));
        let d = Limits::default();
        let want = [
            ("min_side", d.min_side.to_string()),
            ("max_side", d.max_side.to_string()),
            ("max_steps", d.max_steps.to_string()),
            ("max_images", d.max_images.to_string()),
            ("max_prompt_bytes", d.max_prompt_bytes.to_string()),
            ("max_init_image_bytes", d.max_init_image_bytes.to_string()),
            ("max_request_seconds", d.max_request_seconds.to_string()),
        ];
        for (id, value) in want {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no flag {id}"));
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            assert_eq!(defaults, vec![value], "{id}");
        }
        assert_eq!(
            cmd.get_arguments().count(),
            7,
            "a flag without a check here"
        );
    }
}
