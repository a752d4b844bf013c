//! The stack under test: `sdctl up` (so its supervision is exercised), and
//! the table of its processes kept from the lines sdctl prints for every
//! start, SERVING and exit (`process EVENT name=… replica=… pid=… addr=…
//! restarts=… [status=…]`; see sdctl's README section).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sd_launch::{Launch, Process, Stop};

/// One line of sdctl's, when it was read.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    /// `started`, `serving` or `exited`.
    pub kind: String,
    pub name: String,
    pub replica: usize,
    pub pid: u32,
    pub addr: String,
}

impl Event {
    fn parse(line: &str, at: Instant) -> Option<Event> {
        let mut words = line.split(' ');
        if words.next()? != "process" {
            return None;
        }
        let kind = words.next()?.to_string();
        let fields: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
        Some(Event {
            at,
            kind,
            name: fields.get("name")?.to_string(),
            replica: fields.get("replica")?.parse().ok()?,
            pid: fields.get("pid")?.parse().ok()?,
            addr: fields.get("addr")?.to_string(),
        })
    }
}

/// A process of the stack as last reported.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub replica: usize,
    pub pid: u32,
    pub addr: String,
    pub running: bool,
}

impl Member {
    /// `denoiser#1`.
    pub fn label(&self) -> String {
        format!("{}#{}", self.name, self.replica)
    }
}

#[derive(Default)]
struct Seen {
    members: BTreeMap<(String, usize), Member>,
    events: Vec<Event>,
}

/// `sdctl up` and what it has said about its processes.
pub struct Stack {
    sdctl: Process,
    pub url: String,
    seen: Arc<Mutex<Seen>>,
}

/// How to start the stack.
pub struct StackArgs<'a> {
    pub bin_dir: &'a Path,
    pub model: &'a Path,
    pub denoisers: usize,
    pub gateway_args: &'a [String],
    /// Where sdctl's stderr (every process's log) goes; None: nowhere.
    pub log: Option<&'a Path>,
    /// libtorch threads per model service (`SD_TORCH_THREADS`).
    pub torch_threads: u32,
    /// `sdctl up --jobs --jobs-dir DIR`: a supervised redis-server (its
    /// append-only file in DIR) and async jobs in the gateway.
    pub jobs_dir: Option<&'a Path>,
}

impl Stack {
    pub fn start(a: &StackArgs) -> anyhow::Result<Stack> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut cmd = Command::new(a.bin_dir.join("sdctl"));
        cmd.args(["up", "--port", "0", "--http-port", "0", "--model"])
            .arg(a.model)
            .args(["--replicas", &format!("denoiser={}", a.denoisers)])
            .args(a.gateway_args.iter().map(|g| format!("--gateway-arg={g}")))
            .args(a.jobs_dir.iter().flat_map(|d| {
                [
                    std::ffi::OsString::from("--jobs"),
                    "--jobs-dir".into(),
                    d.into(),
                ]
            }))
            .env("SD_TORCH_THREADS", a.torch_threads.to_string())
            .stderr(match a.log {
                Some(p) => Stdio::from(std::fs::File::create(p)?),
                None => Stdio::null(),
            });
        let sdctl = Launch::new("sdctl up")
            .address_prefix("gateway ready on http://")
            .timeout(Duration::from_secs(600))
            .stop(Stop::Terminate {
                grace: Duration::from_secs(120),
            })
            .forward_lines(tx)
            .spawn(cmd)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reader = seen.clone();
        std::thread::Builder::new()
            .name("sdctl-lines".into())
            .spawn(move || read_lines(&rx, &reader))?;
        Ok(Stack {
            url: sdctl.url(),
            sdctl,
            seen,
        })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every process sdctl has reported, in name order.
    pub fn members(&self) -> Vec<Member> {
        self.seen().members.values().cloned().collect()
    }

    pub fn member(&self, name: &str, replica: usize) -> Option<Member> {
        self.seen()
            .members
            .get(&(name.to_string(), replica))
            .cloned()
    }

    pub fn sdctl_pid(&self) -> u32 {
        self.sdctl.id()
    }

    /// Whether sdctl itself still runs.
    pub fn sdctl_running(&mut self) -> bool {
        matches!(self.sdctl.try_wait(), Ok(None))
    }

    /// The first event `want` picks, waiting up to `timeout` for it.
    pub async fn wait_event(
        &self,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.seen().events.iter().find(|e| want(e)) {
                return Some(e.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM to sdctl (it stops the stack in order), and its exit status.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        Ok(self.sdctl.stop()?.status())
    }
}

fn read_lines(rx: &Receiver<String>, seen: &Mutex<Seen>) {
    for line in rx.iter() {
        let Some(e) = Event::parse(&line, Instant::now()) else {
            continue;
        };
        let mut s = seen.lock().unwrap_or_else(PoisonError::into_inner);
        s.members.insert(
            (e.name.clone(), e.replica),
            Member {
                name: e.name.clone(),
                replica: e.replica,
                pid: e.pid,
                addr: e.addr.clone(),
                running: e.kind != "exited",
            },
        );
        s.events.push(e);
    }
}

/// Send `sig` to `pid` (a process of the stack).
pub fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill(2) takes no pointers; the pid is one sdctl reported as
    // running, a child of sdctl's.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Whether the server at `addr` answers SERVING (within a second).
pub async fn serving(addr: &str) -> bool {
    sd_proto::health::is_serving(addr, Duration::from_secs(1)).await
}
