//! One supervised process of `sdctl up`: how to start it (again, on the
//! same address), where it is in its life, and the lines that report it.
//!
//! Every start, every SERVING and every exit is printed on stdout as one
//! line, for tools that watch the stack (the chaos harness, tests):
//!
//! ```text
//! process started name=denoiser replica=1 pid=4242 addr=127.0.0.1:40103 restarts=0
//! process serving name=denoiser replica=1 pid=4242 addr=127.0.0.1:40103 restarts=0
//! process exited name=denoiser replica=1 pid=4242 addr=127.0.0.1:40103 restarts=0 status=signal:9
//! ```
//!
//! `name` is a stage (`text-encoder`, `denoiser`, `autoencoder`) or
//! `gateway`; `replica` counts from 0 within its name; `restarts` is how
//! many times this replica was started again; `status` is `code:N` or
//! `signal:N`.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::token::StackToken;
use sd_launch::{Launch, LaunchError, Process, Stop};

/// How long a server may take to print its address (it does so before
/// loading its model).
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond its drain time, how long a stopping process may take to exit
/// (the servers give lingering connections 2 s after the drain) before it
/// is killed.
pub const EXIT_MARGIN: Duration = Duration::from_secs(10);

/// The name of the gateway's process (the others are named by stage).
pub const GATEWAY: &str = "gateway";
/// The name of the job store's process (`sdctl up --jobs`).
pub const REDIS: &str = "redis";

/// What kind of server a process is: one of ours (it prints `listening on
/// ADDR` and answers grpc.health.v1), or the job store's `redis-server`
/// (on the port chosen for it, SERVING once it answers PING).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Grpc,
    Redis,
}

/// What a supervised process is and how it is started.
#[derive(Debug, Clone)]
pub struct Spec {
    /// A stage name or `gateway`.
    pub name: &'static str,
    /// Which replica of `name`, from 0.
    pub replica: usize,
    pub bin: PathBuf,
    /// Its flags (`--drain-secs` among them), `--listen` aside.
    pub args: Vec<String>,
    /// `--listen`: port 0 until it first listens, then the address it got,
    /// so a restarted replica comes back where the gateway looks for it.
    pub listen: String,
    /// The gateway's `--http-listen`, like `listen`: port 0 until it first
    /// listens, then the address it got.
    pub http_listen: Option<String>,
    /// Its `--drain-secs`: how long its work in flight may take to finish
    /// after SIGTERM.
    pub drain: Duration,
    /// The stack's internal token, given in its environment.
    pub token: &'static StackToken,
    /// More environment (the model services' `LD_PRELOAD`).
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    pub kind: Kind,
}

/// Where a supervised process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, not yet SERVING.
    Starting {
        since: Instant,
    },
    Serving {
        since: Instant,
    },
    /// Not running; to be started (again) at `at`.
    Waiting {
        at: Instant,
    },
}

/// A supervised process: its spec, the running process (if any), its state
/// and its restart history.
pub struct Child {
    pub spec: Spec,
    pub process: Option<Process>,
    pub state: State,
    /// Times started again after an exit.
    pub restarts: u32,
    /// Exits in a row before reaching SERVING.
    pub failed_starts: u32,
    /// The wait before the next restart.
    pub backoff: Duration,
    /// The pid of the last process started (kept after it exits, for the
    /// exit line).
    pid: u32,
}

impl Child {
    pub fn new(spec: Spec, backoff: Duration) -> Self {
        Child {
            spec,
            process: None,
            state: State::Waiting { at: Instant::now() },
            restarts: 0,
            failed_starts: 0,
            backoff,
            pid: 0,
        }
    }

    /// `denoiser[1]`, for messages.
    pub fn label(&self) -> String {
        format!("{}[{}]", self.spec.name, self.spec.replica)
    }

    /// The address it listens on (`host:port`; port 0 before its first start).
    pub fn addr(&self) -> &str {
        &self.spec.listen
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.spec.listen)
    }

    /// Start the process and wait for its `listening on` line (blocking:
    /// the servers print it before loading anything); from then on it
    /// listens on that address, restarts included.
    pub fn start(&mut self) -> Result<(), LaunchError> {
        let mut command = match self.spec.kind {
            Kind::Grpc => {
                let mut command = std::process::Command::new(&self.spec.bin);
                command
                    .args(&self.spec.args)
                    .args(["--listen", &self.spec.listen]);
                if let Some(http) = &self.spec.http_listen {
                    command.args(["--http-listen", http]);
                }
                self.spec.token.give_to(&mut command);
                command
            }
            // redis-server says nothing of its address on stdout: a shell
            // says it (the port is fixed in its flags), then becomes it.
            Kind::Redis => {
                let mut command = std::process::Command::new("sh");
                command
                    .args(["-c", "echo \"listening on $0\"; exec \"$@\""])
                    .arg(&self.spec.listen)
                    .arg(&self.spec.bin)
                    .args(&self.spec.args);
                command
            }
        };
        command.stderr(Stdio::inherit());
        command.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        detach(&mut command);
        let process = Launch::new(self.label())
            .timeout(ADDRESS_TIMEOUT)
            .stop(Stop::Terminate {
                grace: self.spec.drain + EXIT_MARGIN,
            })
            .spawn(command)?;
        self.spec.listen = process.addr().to_string();
        if let (Some(_), Some(http)) = (&self.spec.http_listen, process.http_addr()) {
            self.spec.http_listen = Some(http);
        }
        self.pid = process.id();
        self.process = Some(process);
        self.state = State::Starting {
            since: Instant::now(),
        };
        self.report("started", "");
        Ok(())
    }

    /// Its exit status, once it has exited (None while running or not started).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.as_mut()?.try_wait().ok().flatten()
    }

    /// Whether it answers SERVING on grpc.health.v1 (within a second).
    pub async fn is_serving(&self) -> bool {
        match self.spec.kind {
            Kind::Grpc => sd_proto::health::is_serving(&self.url(), Duration::from_secs(1)).await,
            Kind::Redis => redis_pong(&self.spec.listen).await,
        }
    }

    /// Mark it SERVING (and say so).
    pub fn serving(&mut self) {
        self.state = State::Serving {
            since: Instant::now(),
        };
        self.failed_starts = 0;
        self.report("serving", "");
    }

    /// Forget the process that exited with `status` (and say so).
    pub fn forget(&mut self, status: ExitStatus) {
        self.process = None;
        self.report("exited", &format!(" status={}", status_word(status)));
    }

    /// One `process EVENT ...` line on stdout (see the module docs).
    fn report(&self, event: &str, extra: &str) {
        println!(
            "process {event} name={} replica={} pid={} addr={} restarts={}{extra}",
            self.spec.name, self.spec.replica, self.pid, self.spec.listen, self.restarts
        );
    }
}

/// Whether a Redis at `addr` answers PING (within a second); a Redis still
/// loading its append-only file answers `-LOADING`, which is not yet.
async fn redis_pong(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(1), talk)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `code:N` or `signal:N`.
pub fn status_word(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("code:{c}"),
        (None, Some(s)) => format!("signal:{s}"),
        (None, None) => "unknown".to_string(),
    }
}

/// Start the child in a process group of its own, so a Ctrl-C at the
/// terminal reaches only sdctl, which then stops the stack in order; and
/// have the kernel send it SIGTERM should sdctl die without stopping it
/// (`PR_SET_PDEATHSIG`; children are started from sdctl's main thread,
/// which lives as long as sdctl, as the signal follows the thread that
/// forked).
fn detach(command: &mut std::process::Command) {
    // SAFETY: getpid(2) is async-signal-safe and takes no pointers.
    let parent = unsafe { libc::getpid() };
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (prctl, getppid, kill, getpid), with
    // no allocation and no locks.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // sdctl died between the fork and the prctl: nobody would stop us.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
}
