//! Keeping the stack up: a process that exits is started again on the same
//! address, after a backoff that doubles with each exit (reset once it has
//! served a while), while the others keep serving; a process that exits
//! again and again before ever reaching SERVING is given up on, and the
//! stack stopped. Stopping drains in order: the gateway first (it refuses
//! new work and finishes what is in flight, which needs the model services
//! still up), then the model services.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use sd_launch::Stopped;

use crate::child::{Child, Spec, State, GATEWAY};

/// When and how often to restart.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The wait before the first restart; it doubles with each restart ...
    pub first_backoff: Duration,
    /// ... up to this.
    pub max_backoff: Duration,
    /// A process that served this long before it exited is restarted after
    /// `first_backoff` again.
    pub reset_after: Duration,
    /// Exits in a row before SERVING after which sdctl gives up.
    pub max_failed_starts: u32,
    /// How long a process may take to reach SERVING; a restarted one that
    /// takes longer is killed and counts as a failed start.
    pub load_timeout: Duration,
}

/// How often the children are looked at.
const TICK: Duration = Duration::from_millis(200);

/// Every process of the stack: the model services, then the gateway (last).
pub struct Supervisor {
    children: Vec<Child>,
    policy: Policy,
}

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Supervisor {
            children: Vec::new(),
            policy,
        }
    }

    pub fn children(&self) -> &[Child] {
        &self.children
    }

    /// Start processes for `specs` and wait until each is SERVING. At
    /// start-up a process that exits is an error, not restarted: what is
    /// wrong is most likely the flags or the model, which a restart will
    /// not change. Every process started is kept, also on error, to be
    /// stopped.
    pub async fn bring_up(&mut self, specs: Vec<Spec>) -> anyhow::Result<()> {
        let first = self.children.len();
        for spec in specs {
            let mut child = Child::new(spec, self.policy.first_backoff);
            let started = child.start();
            self.children.push(child);
            started?;
        }
        let deadline = Instant::now() + self.policy.load_timeout;
        while !self.children[first..]
            .iter()
            .all(|c| matches!(c.state, State::Serving { .. }))
        {
            for c in &mut self.children[first..] {
                if let Some(status) = c.exited() {
                    anyhow::bail!("{} exited ({status}) while loading", c.label());
                }
                if matches!(c.state, State::Starting { .. }) && c.is_serving().await {
                    c.serving();
                    eprintln!("sdctl: {} SERVING on {}", c.label(), c.addr());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("not SERVING after {:?}", self.policy.load_timeout);
            }
            tokio::time::sleep(TICK).await;
        }
        Ok(())
    }

    /// Keep every process up until `stop` resolves (Ok), or until one has
    /// failed to start too many times in a row (the error says which).
    pub async fn supervise(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(TICK) => {}
            }
            for i in 0..self.children.len() {
                self.look_after(i).await?;
            }
        }
    }

    /// One look at child `i`: notice an exit, a start-up that reached
    /// SERVING or took too long, a restart that is due.
    async fn look_after(&mut self, i: usize) -> anyhow::Result<()> {
        let policy = self.policy;
        let c = &mut self.children[i];
        match c.state {
            State::Waiting { at } if Instant::now() >= at => restart(c, &policy),
            State::Waiting { .. } => Ok(()),
            State::Starting { .. } | State::Serving { .. } if c.process.is_none() => Ok(()),
            State::Starting { since } | State::Serving { since } => {
                if let Some(status) = c.exited() {
                    return exited(c, &policy, Some(status));
                }
                if matches!(c.state, State::Serving { .. }) {
                    return Ok(());
                }
                if c.is_serving().await {
                    c.serving();
                    return Ok(());
                }
                if since.elapsed() > policy.load_timeout {
                    eprintln!(
                        "sdctl: {} not SERVING after {:?}; killing it",
                        c.label(),
                        policy.load_timeout
                    );
                    let status = kill(c);
                    return exited(c, &policy, status);
                }
                Ok(())
            }
        }
    }

    /// Stop the stack in order: SIGTERM to the gateway and wait for it (its
    /// drain time and a margin; SIGKILL after that), then SIGTERM to every
    /// model service at once and wait for them the same way.
    pub fn shutdown(&mut self) {
        let n = self.children.len();
        let has_gateway = self.children.last().is_some_and(|c| c.spec.name == GATEWAY);
        let (services, gateway) = self.children.split_at_mut(n - usize::from(has_gateway));
        stop_together(gateway);
        stop_together(services);
    }
}

/// Start `c` again; a start that fails counts as an exit before SERVING.
fn restart(c: &mut Child, policy: &Policy) -> anyhow::Result<()> {
    c.restarts += 1;
    match c.start() {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("sdctl: restarting {}: {e}", c.label());
            exited(c, policy, None)
        }
    }
}

/// SIGKILL to `c`'s process; its status once reaped.
fn kill(c: &mut Child) -> Option<ExitStatus> {
    let p = c.process.as_mut()?;
    let _ = p.signal(libc::SIGKILL);
    p.wait_exit(Duration::from_secs(10)).ok().flatten()
}

/// `c` exited (with `status`, if known): schedule its restart after its
/// backoff, or give up if it never reached SERVING too many times in a row.
fn exited(c: &mut Child, policy: &Policy, status: Option<ExitStatus>) -> anyhow::Result<()> {
    let served = match c.state {
        State::Serving { since } => Some(since.elapsed()),
        _ => None,
    };
    let how = status.map_or_else(|| "did not start".to_string(), |s| s.to_string());
    if let Some(s) = status {
        c.forget(s);
    }
    if served.is_none() {
        c.failed_starts += 1;
        if c.failed_starts >= policy.max_failed_starts {
            anyhow::bail!(
                "{} failed {} times in a row before SERVING (last: {how}); giving up",
                c.label(),
                c.failed_starts
            );
        }
    }
    if served.is_some_and(|d| d >= policy.reset_after) {
        c.backoff = policy.first_backoff;
    }
    let wait = c.backoff;
    c.backoff = (wait * 2).min(policy.max_backoff);
    c.state = State::Waiting {
        at: Instant::now() + wait,
    };
    eprintln!(
        "sdctl: {} exited ({how}); restart {} in {wait:?}",
        c.label(),
        c.restarts + 1
    );
    Ok(())
}

/// SIGTERM to every running process of `children` at once, then wait for
/// each (its drain time and a margin, then SIGKILL).
fn stop_together(children: &mut [Child]) {
    let mut running = Vec::new();
    let mut procs = Vec::new();
    for (i, c) in children.iter_mut().enumerate() {
        if let Some(p) = c.process.take() {
            running.push(i);
            procs.push(p);
        }
    }
    let stopped = sd_launch::stop_all(&mut procs);
    for (i, stopped) in running.into_iter().zip(stopped) {
        let c = &mut children[i];
        match stopped {
            Ok(Stopped::Exited(s)) => c.forget(s),
            Ok(Stopped::Killed(s)) => {
                eprintln!(
                    "sdctl: {} did not stop within {:?}; killed it",
                    c.label(),
                    c.spec.drain + crate::child::EXIT_MARGIN
                );
                c.forget(s);
            }
            Err(e) => eprintln!("sdctl: stopping {}: {e}", c.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
            max_failed_starts: 3,
            load_timeout: Duration::from_secs(60),
        }
    }

    fn child(state: State) -> Child {
        let mut c = Child::new(
            Spec {
                name: "denoiser",
                replica: 1,
                bin: "sd-denoiser".into(),
                args: Vec::new(),
                listen: "127.0.0.1:0".into(),
                http_listen: None,
                drain: Duration::from_secs(30),
                token: crate::token::stack_token().unwrap(),
                env: Vec::new(),
                kind: crate::child::Kind::Grpc,
            },
            policy().first_backoff,
        );
        c.state = state;
        c
    }

    fn serving_for(d: Duration) -> State {
        State::Serving {
            since: Instant::now() - d,
        }
    }

    /// The wait `exited` scheduled.
    fn scheduled(c: &Child) -> Duration {
        match c.state {
            State::Waiting { at } => at.saturating_duration_since(Instant::now()),
            s => panic!("not waiting: {s:?}"),
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_the_most_and_resets_after_serving_a_while() {
        let p = policy();
        let mut c = child(serving_for(Duration::from_secs(1)));
        let mut waits = Vec::new();
        for _ in 0..9 {
            c.state = serving_for(Duration::from_secs(1));
            exited(&mut c, &p, None).expect("served, so restarted");
            // Rounded up to whole 100 ms (the clock moved since).
            waits.push(scheduled(&c).as_millis().div_ceil(100) * 100);
        }
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        c.state = serving_for(Duration::from_secs(31));
        exited(&mut c, &p, None).expect("restarted");
        assert!(scheduled(&c) <= Duration::from_millis(500));
        assert_eq!(c.backoff, Duration::from_secs(1));
    }

    #[test]
    fn exits_in_a_row_before_serving_give_up_with_who_and_why() {
        let p = policy();
        let mut c = child(State::Starting {
            since: Instant::now(),
        });
        exited(&mut c, &p, None).expect("first failed start");
        c.state = State::Starting {
            since: Instant::now(),
        };
        exited(&mut c, &p, None).expect("second failed start");
        // Reaching SERVING forgives the failures.
        c.serving();
        assert_eq!(c.failed_starts, 0);
        for _ in 0..2 {
            c.state = State::Starting {
                since: Instant::now(),
            };
            exited(&mut c, &p, None).expect("not yet three in a row");
        }
        c.state = State::Starting {
            since: Instant::now(),
        };
        let e = exited(&mut c, &p, None).expect_err("three in a row");
        assert_eq!(
            e.to_string(),
            "denoiser[1] failed 3 times in a row before SERVING (last: did not start); giving up"
        );
    }
}
