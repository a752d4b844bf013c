//! The faults the harness injects, and how it tells that the process hit
//! is back.

use std::time::{Duration, Instant};

use crate::stack::{serving, signal, Stack};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL to denoiser replica 0 (sdctl restarts it).
    KillDenoiser,
    /// SIGSTOP to denoiser replica 1, SIGCONT `--stop-secs` later.
    StopDenoiser,
    /// SIGTERM to the gateway: it drains and exits; sdctl restarts it.
    TermGateway,
    /// SIGTERM to the text encoder: it drains and exits; sdctl restarts it.
    RestartTextEncoder,
    /// SIGKILL to the gateway: no drain; sdctl restarts it (`--jobs`: its
    /// running jobs wait out their lease, then run again).
    KillGateway,
    /// SIGKILL to the job store's redis-server (`--jobs`); sdctl restarts
    /// it on the same port and it reloads its append-only file.
    KillRedis,
}

impl Fault {
    pub const ALL: [Fault; 4] = [
        Fault::KillDenoiser,
        Fault::StopDenoiser,
        Fault::TermGateway,
        Fault::RestartTextEncoder,
    ];

    /// The jobs phase's faults (`--jobs`), in order.
    pub const JOBS: [Fault; 3] = [Fault::KillGateway, Fault::KillRedis, Fault::KillDenoiser];

    /// The process it hits: (name, replica).
    fn target(self) -> (&'static str, usize) {
        match self {
            Fault::KillDenoiser => ("denoiser", 0),
            Fault::StopDenoiser => ("denoiser", 1),
            Fault::TermGateway | Fault::KillGateway => ("gateway", 0),
            Fault::RestartTextEncoder => ("text-encoder", 0),
            Fault::KillRedis => ("redis", 0),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Fault::KillDenoiser => "SIGKILL denoiser#0",
            Fault::StopDenoiser => "SIGSTOP/SIGCONT denoiser#1",
            Fault::TermGateway => "SIGTERM gateway",
            Fault::RestartTextEncoder => "SIGTERM text-encoder",
            Fault::KillGateway => "SIGKILL gateway",
            Fault::KillRedis => "SIGKILL redis",
        }
    }
}

/// A fault injected and what became of the process it hit.
#[derive(Debug, Clone)]
pub struct Injected {
    pub at: Instant,
    /// From the fault until the process hit served again (a new process,
    /// for the faults that end one), if it did within the wait.
    pub back_after: Option<Duration>,
}

/// Inject `fault` and wait (at most `patience`) until its process serves
/// again; a SIGSTOPped process is continued after `stopped_for`.
pub async fn inject(
    stack: &Stack,
    fault: Fault,
    stopped_for: Duration,
    patience: Duration,
) -> anyhow::Result<Injected> {
    let (name, replica) = fault.target();
    let m = stack
        .member(name, replica)
        .filter(|m| m.running)
        .ok_or_else(|| anyhow::anyhow!("{name}#{replica} is not running"))?;
    let at = Instant::now();
    let back_after = if fault == Fault::StopDenoiser {
        signal(m.pid, libc::SIGSTOP)?;
        tokio::time::sleep(stopped_for).await;
        signal(m.pid, libc::SIGCONT)?;
        let until = Instant::now() + patience;
        loop {
            if serving(&m.addr).await {
                break Some(at.elapsed());
            }
            if Instant::now() > until {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        let sig = match fault {
            Fault::KillDenoiser | Fault::KillGateway | Fault::KillRedis => libc::SIGKILL,
            _ => libc::SIGTERM,
        };
        signal(m.pid, sig)?;
        let back = stack
            .wait_event(patience, |e| {
                e.kind == "serving" && e.name == name && e.replica == replica && e.pid != m.pid
            })
            .await;
        back.map(|e| e.at.saturating_duration_since(at))
    };
    Ok(Injected { at, back_after })
}
