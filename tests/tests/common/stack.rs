//! A real sdserve stack for a test: `sdctl up --port 0` on a fixture model,
//! stopped (SIGTERM, then SIGKILL) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sd_launch::{Launch, Process, Stop};

/// The directory holding the built binaries (next to the test's own `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in [
        "sdctl",
        "sd-gateway",
        "sd-text-encoder",
        "sd-denoiser",
        "sd-autoencoder",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: run `cargo build --workspace --bins` first (make test does)",
            dir.join(b).display()
        );
    }
    dir
}

/// `sdctl up` on a fixture model; dropping it stops the stack (SIGTERM, so
/// sdctl stops its servers, then SIGKILL after 20 s).
pub struct Stack {
    pub url: String,
    /// The gateway's HTTP base URL (`http://host:port`).
    pub http: String,
    _sdctl: Process,
}

impl Stack {
    pub fn start(model: &Path) -> Stack {
        Stack::start_with(model, &[])
    }

    /// A stack with more `sdctl up` flags (e.g. `--precision bf16`).
    pub fn start_with(model: &Path, flags: &[&str]) -> Stack {
        let mut args = vec!["--model", model.to_str().expect("a UTF-8 model path")];
        args.extend_from_slice(flags);
        Stack::launch(&args, &[])
    }

    /// A stack on sdserve's default model: `sdctl up` with no `--model`
    /// (and no `SD_MODEL`).
    pub fn start_default() -> Stack {
        Stack::launch(&[], &["SD_MODEL"])
    }

    /// A stack with more `sdctl up` flags and environment for its servers
    /// (e.g. the gateway's `SD_WIRE_DTYPE`).
    pub fn start_with_env(model: &Path, flags: &[&str], env: &[(&str, &str)]) -> Stack {
        let mut args = vec!["--model", model.to_str().expect("a UTF-8 model path")];
        args.extend_from_slice(flags);
        Stack::launch_with(&args, &[], env)
    }

    fn launch(flags: &[&str], unset: &[&str]) -> Stack {
        Stack::launch_with(flags, unset, &[])
    }

    fn launch_with(flags: &[&str], unset: &[&str], env: &[(&str, &str)]) -> Stack {
        let mut cmd = Command::new(bin_dir().join("sdctl"));
        cmd.args(["up", "--port", "0", "--http-port", "0"])
            .args(flags)
            .env("SD_TORCH_THREADS", "1")
            .envs(env.iter().copied())
            .stderr(Stdio::null());
        for var in unset {
            cmd.env_remove(var);
        }
        let sdctl = Launch::new("sdctl up")
            .address_prefix("gateway ready on http://")
            .timeout(Duration::from_secs(120))
            .stop(Stop::Terminate {
                grace: Duration::from_secs(20),
            })
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("the stack did not come up: {:#}", anyhow::Error::new(e)));
        let http = format!(
            "http://{}",
            sdctl
                .http_addr()
                .expect("sdctl up printed no `http on ADDR` line")
        );
        Stack {
            url: sdctl.url(),
            http,
            _sdctl: sdctl,
        }
    }

    /// sdctl's process id (its children are the stack's servers).
    pub fn pid(&self) -> u32 {
        self._sdctl.id()
    }
}
