//! The soak: N generations of the mix, no faults; at the baseline call
//! count, every `every` calls and at the end, the load is paused, the
//! requests in flight finish, and every process's usage is read at rest,
//! so the readings compare like with like.

use std::fmt::Write;
use std::time::{Duration, Instant};

use crate::chaos::{finish, processes, start_clients};
use crate::load::{Load, Mix, Record};
use crate::procs::Snapshot;
use crate::stack::Stack;

#[derive(Debug, Clone)]
pub struct Plan {
    pub calls: usize,
    pub baseline: usize,
    pub every: usize,
    pub clients: usize,
    pub mix: Mix,
    pub seed: u64,
    pub max_time: Duration,
}

pub struct Outcome {
    /// (calls completed, usage then), the baseline first, the end last.
    pub snapshots: Vec<(usize, Snapshot)>,
    pub records: Vec<Record>,
}

/// The call counts to read usage at: the baseline, every `every`, the end.
fn checkpoints(p: &Plan) -> Vec<usize> {
    let mut v: Vec<usize> = (1..)
        .map(|k| k * p.every.max(1))
        .take_while(|&c| c < p.calls)
        .filter(|&c| c > p.baseline)
        .collect();
    v.insert(0, p.baseline.min(p.calls));
    v.push(p.calls);
    v.dedup();
    v
}

/// After this long at rest, usage is read (threads that ended their work
/// have had a moment to go).
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(stack: &Stack, plan: &Plan) -> anyhow::Result<Outcome> {
    let load = Load::new(plan.calls)?;
    let until = Instant::now() + plan.max_time;
    let clients = start_clients(&stack.url, &load, plan.clients, plan.mix, plan.seed);
    let mut snapshots = Vec::new();
    for point in checkpoints(plan) {
        while load.done() < point && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        load.pause(true);
        while load.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(SETTLE).await;
        let done = load.done();
        snapshots.push((
            done,
            Snapshot::take(format!("call {done}"), &processes(stack)),
        ));
        load.pause(false);
        if Instant::now() >= until {
            break;
        }
    }
    finish(&load, clients).await;
    Ok(Outcome {
        snapshots,
        records: load.records(),
    })
}

/// Growth of each process from the first reading to the last: RSS in
/// percent, threads and fds in counts; and whether it stays within
/// `max_rss_pct` and does not grow in threads or fds.
pub fn growth(o: &Outcome, max_rss_pct: f64) -> (String, bool) {
    let (Some((c0, first)), Some((c1, last))) = (o.snapshots.first(), o.snapshots.last()) else {
        return ("No readings.\n".into(), false);
    };
    let mut s = format!(
        "| process | RSS at call {c0} | RSS at call {c1} | RSS growth | threads | fds |\n\
         |---|---:|---:|---:|---|---|\n"
    );
    let mut ok = true;
    for (label, _, _) in &first.rows {
        let (Some(a), Some(b)) = (first.usage(label), last.usage(label)) else {
            let _ = writeln!(s, "| {label} | | | not running at both | | |");
            ok = false;
            continue;
        };
        let pct = (b.rss_kib as f64 / a.rss_kib as f64 - 1.0) * 100.0;
        ok &= pct < max_rss_pct && b.threads <= a.threads && b.fds <= a.fds;
        let _ = writeln!(
            s,
            "| {label} | {:.1} MB | {:.1} MB | {pct:+.1}% | {} → {} | {} → {} |",
            a.rss_kib as f64 / 1024.0,
            b.rss_kib as f64 / 1024.0,
            a.threads,
            b.threads,
            a.fds,
            b.fds
        );
    }
    (s, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(calls: usize, baseline: usize, every: usize) -> Plan {
        Plan {
            calls,
            baseline,
            every,
            clients: 1,
            mix: Mix {
                kinds: [1, 0, 0, 0, 0],
                unique_prompts: 0,
            },
            seed: 0,
            max_time: Duration::from_secs(1),
        }
    }

    #[test]
    fn checkpoints_are_the_baseline_every_n_and_the_end() {
        assert_eq!(
            checkpoints(&plan(1000, 100, 100)),
            [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
        );
        assert_eq!(checkpoints(&plan(150, 50, 100)), [50, 100, 150]);
        assert_eq!(checkpoints(&plan(150, 200, 100)), [150]);
        assert_eq!(checkpoints(&plan(250, 120, 100)), [120, 200, 250]);
    }
}
