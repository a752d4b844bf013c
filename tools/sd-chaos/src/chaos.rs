//! The chaos run: load from the first moment; a quiet phase; then each
//! fault in turn, a phase while it lasts (until the process hit serves
//! again) and a quiet phase after it; every process's usage at the end of
//! each phase.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::faults::{self, Fault};
use crate::load::{Load, Mix, Record};
use crate::procs::Snapshot;
use crate::report::Phase;
use crate::stack::Stack;

/// What the run is bounded by and what it injects.
#[derive(Debug, Clone)]
pub struct Plan {
    pub clients: usize,
    pub mix: Mix,
    pub seed: u64,
    pub max_requests: usize,
    pub max_time: Duration,
    pub quiet: Duration,
    pub faults: Vec<Fault>,
    pub stopped_for: Duration,
}

/// What the run saw.
pub struct Outcome {
    pub phases: Vec<Phase>,
    pub records: Vec<Record>,
    pub snapshots: Vec<Snapshot>,
    pub sdctl_survived: bool,
}

/// How long the harness waits for a process hit to serve again.
const RECOVERY_PATIENCE: Duration = Duration::from_secs(120);

/// Every running process of the stack and sdctl, as (label, pid).
pub fn processes(stack: &Stack) -> Vec<(String, u32)> {
    let mut v = vec![("sdctl".to_string(), stack.sdctl_pid())];
    v.extend(
        stack
            .members()
            .into_iter()
            .filter(|m| m.running)
            .map(|m| (m.label(), m.pid)),
    );
    v
}

/// Start `clients` client tasks on `load`.
pub fn start_clients(
    url: &str,
    load: &Arc<Load>,
    clients: usize,
    mix: Mix,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            tokio::spawn(crate::load::client(
                url.to_string(),
                load.clone(),
                mix,
                seed.wrapping_mul(1000).wrapping_add(c as u64),
            ))
        })
        .collect()
}

/// Stop sending and wait for the requests in flight (each is bounded).
pub async fn finish(load: &Load, clients: Vec<tokio::task::JoinHandle<()>>) {
    load.stop();
    for c in clients {
        let _ = c.await;
    }
}

struct Run<'a> {
    stack: &'a Stack,
    load: Arc<Load>,
    phases: Vec<Phase>,
    snapshots: Vec<Snapshot>,
    until: Instant,
}

impl Run<'_> {
    /// End the phase running, if any.
    fn close(&mut self) {
        if let Some(p) = self.phases.last_mut() {
            p.end = Instant::now();
        }
    }

    fn begin(&mut self, name: String) {
        self.close();
        let now = Instant::now();
        self.phases.push(Phase {
            name,
            start: now,
            end: now,
            fault: None,
        });
        self.load
            .phase
            .store(self.phases.len() - 1, Ordering::SeqCst);
    }

    fn snapshot(&mut self, label: String) {
        self.snapshots
            .push(Snapshot::take(label, &processes(self.stack)));
    }

    /// Let the load run for `d` (less if the run is out of time or requests).
    async fn quiet(&self, d: Duration) {
        let until = (Instant::now() + d).min(self.until);
        while Instant::now() < until && !self.load.exhausted() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn over(&self) -> bool {
        self.load.exhausted() || Instant::now() >= self.until
    }
}

pub async fn run(stack: &mut Stack, plan: &Plan) -> anyhow::Result<Outcome> {
    let load = Load::new(plan.max_requests)?;
    let mut run = Run {
        stack,
        load: load.clone(),
        phases: Vec::new(),
        snapshots: Vec::new(),
        until: Instant::now() + plan.max_time,
    };
    run.snapshot("start".into());
    run.begin("before".into());
    let clients = start_clients(&run.stack.url, &load, plan.clients, plan.mix, plan.seed);
    run.quiet(plan.quiet).await;
    run.snapshot("end of before".into());
    for &fault in &plan.faults {
        if run.over() {
            break;
        }
        run.begin(format!("during {}", fault.describe()));
        let injected =
            faults::inject(run.stack, fault, plan.stopped_for, RECOVERY_PATIENCE).await?;
        if let Some(p) = run.phases.last_mut() {
            p.fault = Some(injected);
        }
        run.snapshot(format!("end of during {}", fault.describe()));
        run.begin(format!("after {}", fault.describe()));
        run.quiet(plan.quiet).await;
        run.snapshot(format!("end of after {}", fault.describe()));
    }
    finish(&load, clients).await;
    run.close();
    run.snapshot("end".into());
    let Run {
        phases, snapshots, ..
    } = run;
    Ok(Outcome {
        phases,
        records: load.records(),
        snapshots,
        sdctl_survived: stack.sdctl_running(),
    })
}
