//! Start an sdserve server process and learn where it listens.
//!
//! Every sdserve server prints `listening on ADDR` on stdout once its gRPC
//! socket is bound (before its model has loaded), and, when started with
//! `--metrics-listen`, `metrics on ADDR` right after it. [`Launch`] starts
//! a [`Command`], reads those lines with a timeout, tells a process that
//! exits (or closes stdout) before listening from one that is slow, and keeps
//! draining stdout afterwards so the server never blocks on a full pipe. The
//! [`Process`] it returns stops the server when dropped, as its [`Stop`] says.
//!
//! sdctl, sd-bench and the process tests all start servers through here.

mod process;
mod stdout;

use std::io;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

pub use process::{stop_all, Process, Stop, Stopped};
use stdout::{Line, Watch};

/// The line every sdserve server prints once it listens.
pub const LISTENING: &str = "listening on ";
/// The line a server started with `--metrics-listen` prints for `/metrics`.
pub const METRICS: &str = "metrics on ";
/// The line the gateway started with `--http-listen` prints for HTTP (and
/// `sdctl up` after it).
pub const HTTP: &str = "http on ";

/// The directory this program's executable is in: where `cargo build` and
/// the release images put the sdserve binaries side by side.
pub fn bin_dir() -> io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| io::Error::other(format!("{} has no directory", exe.display())))
}

/// Why a server did not come up.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {name} ({program})")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{name} exited ({status}) before listening")]
    ExitedEarly { name: String, status: ExitStatus },
    #[error("{name} closed its stdout before listening")]
    ClosedStdout { name: String },
    #[error("{name} did not print `{expected}ADDR` within {timeout:?}")]
    Timeout {
        name: String,
        expected: String,
        timeout: Duration,
    },
}

/// How to start one server: its name (for messages), how long it may take
/// to announce its address, and how it is stopped.
#[derive(Debug, Clone)]
pub struct Launch {
    name: String,
    address_prefix: String,
    timeout: Duration,
    wait_for_metrics: bool,
    stop: Stop,
    forward: Option<Sender<String>>,
}

impl Launch {
    /// Defaults: wait 60 s for `listening on ADDR`; SIGKILL on drop.
    pub fn new(name: impl Into<String>) -> Self {
        Launch {
            name: name.into(),
            address_prefix: LISTENING.to_string(),
            timeout: Duration::from_secs(60),
            wait_for_metrics: false,
            stop: Stop::Kill,
            forward: None,
        }
    }

    /// How long the process may take to print its address.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Also wait for `metrics on ADDR` (for a server given `--metrics-listen`).
    pub fn wait_for_metrics(mut self) -> Self {
        self.wait_for_metrics = true;
        self
    }

    /// How the process is stopped when the [`Process`] is dropped or stopped.
    pub fn stop(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }

    /// Read the address from lines starting with `prefix` instead of
    /// `listening on ` (e.g. `sdctl up`'s `gateway ready on http://`).
    pub fn address_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.address_prefix = prefix.into();
        self
    }

    /// Send every line the process prints on stdout (the address lines
    /// too) to `lines`, for as long as the process runs: for a process that
    /// reports more than its address (`sdctl up`'s process lines).
    pub fn forward_lines(mut self, lines: Sender<String>) -> Self {
        self.forward = Some(lines);
        self
    }

    /// Start `command` (its stdout is taken over; stdin, stderr, arguments
    /// and environment are the caller's) and wait until it prints its address.
    pub fn spawn(self, mut command: Command) -> Result<Process, LaunchError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let spawn_err = |source| LaunchError::Spawn {
            name: self.name.clone(),
            program: program.clone(),
            source,
        };
        let mut child = command.stdout(Stdio::piped()).spawn().map_err(spawn_err)?;
        let Some(stdout) = child.stdout.take() else {
            process::abandon(&mut child);
            return Err(spawn_err(io::Error::other("no stdout pipe")));
        };
        let (watch, lines) =
            match stdout::watch(stdout, self.address_prefix.clone(), self.forward.clone()) {
                Ok(w) => w,
                Err(e) => {
                    process::abandon(&mut child);
                    return Err(spawn_err(e));
                }
            };
        match self.await_address(&watch, &lines, &mut child) {
            Ok(addr) => Ok(Process::new(self.name, child, addr, watch, self.stop)),
            Err(e) => {
                process::abandon(&mut child);
                Err(e)
            }
        }
    }

    /// The address, once announced (and the metrics address with it, when
    /// asked for); an error if the process goes quiet, exits or times out.
    fn await_address(
        &self,
        watch: &Watch,
        lines: &Receiver<Line>,
        child: &mut std::process::Child,
    ) -> Result<String, LaunchError> {
        let deadline = Instant::now() + self.timeout;
        let mut addr = None;
        loop {
            if let Some(a) = &addr {
                if !self.wait_for_metrics || watch.metrics().is_some() {
                    return Ok(String::clone(a));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(Line::Address(a)) => addr = Some(a),
                Ok(Line::Metrics) => {}
                Ok(Line::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.closed_early(child, deadline));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(LaunchError::Timeout {
                        name: self.name.clone(),
                        expected: self.address_prefix.clone(),
                        timeout: self.timeout,
                    });
                }
            }
        }
    }

    /// Stdout closed before the address: most likely the process is exiting;
    /// give it until the deadline (at most a few seconds) to say how.
    fn closed_early(&self, child: &mut std::process::Child, deadline: Instant) -> LaunchError {
        let until = deadline.min(Instant::now() + Duration::from_secs(5));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return LaunchError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                };
            }
            if Instant::now() >= until {
                return LaunchError::ClosedStdout {
                    name: self.name.clone(),
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests;
