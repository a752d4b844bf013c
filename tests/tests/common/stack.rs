//! A real sdserve stack for a test: `sdctl up --port 0` on a fixture model,
//! stopped (SIGTERM, then SIGKILL) when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

pub struct Stack {
    child: Child,
    pub url: String,
}

impl Stack {
    pub fn start(model: &Path) -> Stack {
        let mut child = Command::new(bin_dir().join("sdctl"))
            .args(["up", "--port", "0", "--model"])
            .arg(model)
            .env("SD_TORCH_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sdctl up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("gateway ready on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(200)) {
                return Stack { child, url };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("sdctl up exited early: {status}");
            }
            assert!(Instant::now() < deadline, "stack did not come up in time");
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: signalling a child we spawned.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
