//! A started server: where it listens, signals, waiting for it, stopping it.

use std::io;
use std::net::SocketAddr;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::stdout::Watch;

/// How a [`Process`] is stopped (by [`Process::stop`], [`stop_all`] or on drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL at once: for throwaway servers (tests, benchmarks).
    Kill,
    /// SIGTERM, so the server drains its work in flight; SIGKILL if it is
    /// still running `grace` later.
    Terminate { grace: Duration },
}

/// How a stopped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It had exited, or exited on SIGTERM within the grace period.
    Exited(ExitStatus),
    /// It was killed: [`Stop::Kill`], or still running after the grace period.
    Killed(ExitStatus),
}

impl Stopped {
    pub fn status(self) -> ExitStatus {
        match self {
            Stopped::Exited(s) | Stopped::Killed(s) => s,
        }
    }
}

/// A running server started by [`crate::Launch`]. Dropping it stops it.
pub struct Process {
    name: String,
    child: Child,
    addr: String,
    watch: Watch,
    stop: Stop,
    /// When SIGTERM was sent, so the grace period is counted once.
    terminated_at: Option<Instant>,
    /// Set by every method that waits for the child: once waited for, its
    /// pid may be reused, so `signal` must not send to it.
    exited: Option<ExitStatus>,
}

impl Process {
    pub(crate) fn new(name: String, child: Child, addr: String, watch: Watch, stop: Stop) -> Self {
        Process {
            name,
            child,
            addr,
            watch,
            stop,
            terminated_at: None,
            exited: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it printed (`host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://` and the address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port of the address, if the address is a socket address.
    pub fn port(&self) -> Option<u16> {
        self.addr.parse::<SocketAddr>().ok().map(|a| a.port())
    }

    /// Where it serves `/metrics`, if it printed `metrics on ADDR`.
    pub fn metrics_addr(&self) -> Option<String> {
        self.watch.metrics()
    }

    /// Where it serves HTTP, if it printed `http on ADDR`.
    pub fn http_addr(&self) -> Option<String> {
        self.watch.http()
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Send signal `sig` (e.g. `libc::SIGTERM`). ESRCH once it has been
    /// seen to exit (its pid may belong to someone else by then).
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        if self.exited.is_some() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(io::Error::other)?;
        // SAFETY: kill(2) takes no pointers. `pid` is our own child and has
        // not been waited for (every wait goes through `&mut self` and sets
        // `exited`), so it is still ours, running or a zombie.
        if unsafe { libc::kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Its exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// Wait up to `timeout` for it to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop it as its [`Stop`] says, and wait for it.
    pub fn stop(&mut self) -> io::Result<Stopped> {
        // A SIGTERM that could not be sent leaves the stopping to SIGKILL.
        let _ = self.begin_stop();
        self.finish_stop()
    }

    /// The non-blocking half of stopping: SIGTERM, once, for `Stop::Terminate`.
    fn begin_stop(&mut self) -> io::Result<()> {
        if self.terminated_at.is_some() || self.try_wait()?.is_some() {
            return Ok(());
        }
        if let Stop::Terminate { .. } = self.stop {
            self.signal(libc::SIGTERM)?;
            self.terminated_at = Some(Instant::now());
        }
        Ok(())
    }

    /// The blocking half: the rest of the grace period, then SIGKILL.
    fn finish_stop(&mut self) -> io::Result<Stopped> {
        if let (Stop::Terminate { grace }, Some(at)) = (self.stop, self.terminated_at) {
            let left = grace.saturating_sub(at.elapsed());
            if let Some(status) = self.wait_exit(left)? {
                return Ok(Stopped::Exited(status));
            }
        } else if let Some(status) = self.try_wait()? {
            return Ok(Stopped::Exited(status));
        }
        self.child.kill()?;
        let status = self.child.wait()?;
        self.exited = Some(status);
        Ok(Stopped::Killed(status))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Stop every process: all are signalled first (last started first), so
/// their grace periods run together, then each is waited for in the same
/// order. The results are in the order of `procs`.
pub fn stop_all(procs: &mut [Process]) -> Vec<io::Result<Stopped>> {
    for p in procs.iter_mut().rev() {
        // A SIGTERM that could not be sent leaves the stopping to SIGKILL.
        let _ = p.begin_stop();
    }
    let mut stopped: Vec<io::Result<Stopped>> =
        procs.iter_mut().rev().map(|p| p.finish_stop()).collect();
    stopped.reverse();
    stopped
}

/// Kill and reap a child that never became a [`Process`].
pub(crate) fn abandon(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
