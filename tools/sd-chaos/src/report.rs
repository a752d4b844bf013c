//! The Markdown tables the harness prints.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use crate::faults::Injected;
use crate::load::{Outcome, Record};
use crate::procs::Snapshot;

/// A stretch of the run: before the faults, or during/after one.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub start: Instant,
    pub end: Instant,
    /// For a "during" phase: the fault and its recovery.
    pub fault: Option<Injected>,
}

/// Counts and latencies of a set of records.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: usize,
    pub ok: usize,
    pub failed: BTreeMap<String, usize>,
    pub cancelled: usize,
    pub deadline: usize,
    /// Seconds of each successful request.
    pub ok_latencies: Vec<f64>,
}

impl Tally {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Tally {
        let mut t = Tally::default();
        for r in records {
            t.sent += 1;
            match &r.outcome {
                Outcome::Ok => {
                    t.ok += 1;
                    t.ok_latencies.push(r.latency().as_secs_f64());
                }
                Outcome::Failed(code, _) => *t.failed.entry(format!("{code:?}")).or_default() += 1,
                Outcome::Cancelled => t.cancelled += 1,
                Outcome::DeadlineHit => t.deadline += 1,
            }
        }
        t
    }

    pub fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    fn failed_cell(&self) -> String {
        if self.failed.is_empty() {
            return "0".into();
        }
        self.failed
            .iter()
            .map(|(c, n)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The `p` quantile of successful latencies, seconds (nearest rank).
    pub fn quantile(&self, p: f64) -> Option<f64> {
        if self.ok_latencies.is_empty() {
            return None;
        }
        let mut v = self.ok_latencies.clone();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    }
}

fn secs(d: Option<f64>) -> String {
    d.map_or("–".into(), |s| format!("{s:.2}"))
}

/// The first request sent after the fault that succeeded: how long after
/// the fault it completed.
fn first_ok_after(records: &[Record], at: Instant) -> Option<Duration> {
    records
        .iter()
        .filter(|r| r.started >= at && r.outcome == Outcome::Ok)
        .map(|r| r.ended - at)
        .min()
}

impl Tally {
    /// sent | ok | failed | cancelled | deadline | p50 | p99, as table cells.
    fn cells(&self) -> String {
        format!(
            "{} | {} | {} | {} | {} | {} | {}",
            self.sent,
            self.ok,
            self.failed_cell(),
            self.cancelled,
            self.deadline,
            secs(self.quantile(0.5)),
            secs(self.quantile(0.99)),
        )
    }
}

/// Requests by phase, with recovery times for the fault phases.
pub fn phases_table(phases: &[Phase], records: &[Record]) -> String {
    let mut s = String::from(
        "| phase | s | sent | ok | failed | cancelled (on purpose) | deadline (on purpose) \
         | p50 s | p99 s | first OK after fault s | process serving again s |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, p) in phases.iter().enumerate() {
        let t = Tally::of(records.iter().filter(|r| r.phase == i));
        let (first_ok, back) = match &p.fault {
            Some(f) => (
                secs(first_ok_after(records, f.at).map(|d| d.as_secs_f64())),
                secs(f.back_after.map(|d| d.as_secs_f64())),
            ),
            None => ("".into(), "".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {:.1} | {} | {first_ok} | {back} |",
            p.name,
            (p.end - p.start).as_secs_f64(),
            t.cells(),
        );
    }
    let _ = writeln!(s, "| **all** | | {} | | |", Tally::of(records).cells());
    s
}

/// Each distinct failure (phase, kind of request, code, message) and how
/// often it happened.
pub fn failures_table(phases: &[Phase], records: &[Record]) -> String {
    let mut seen: BTreeMap<(usize, String, String, String), usize> = BTreeMap::new();
    for r in records {
        if let Outcome::Failed(code, msg) = &r.outcome {
            let key = (
                r.phase,
                format!("{:?}", r.kind),
                format!("{code:?}"),
                msg.clone(),
            );
            *seen.entry(key).or_default() += 1;
        }
    }
    if seen.is_empty() {
        return "No request failed.\n".into();
    }
    let mut s = String::from("| phase | request | code | message | n |\n|---|---|---|---|---:|\n");
    for ((phase, kind, code, msg), n) in seen {
        let name = phases.get(phase).map_or("soak", |p| p.name.as_str());
        let msg = msg.replace('|', "\\|");
        let _ = writeln!(s, "| {name} | {kind} | {code} | {msg} | {n} |");
    }
    s
}

/// Every process's RSS / threads / open fds at each snapshot.
pub fn usage_table(snapshots: &[Snapshot]) -> String {
    let mut columns: Vec<String> = Vec::new();
    for snap in snapshots {
        for (label, _, _) in &snap.rows {
            if !columns.contains(label) {
                columns.push(label.clone());
            }
        }
    }
    let mut s = format!("| t s | moment | {} |\n", columns.join(" | "));
    let _ = writeln!(s, "|---:|---|{}", "---|".repeat(columns.len()));
    let Some(t0) = snapshots.first().map(|s| s.at) else {
        return s;
    };
    for snap in snapshots {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| snap.usage(c).map_or("–".into(), |u| u.cell()))
            .collect();
        let t = (snap.at - t0).as_secs_f64();
        let _ = writeln!(s, "| {t:.0} | {} | {} |", snap.label, cells.join(" | "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Kind;
    use tonic::Code;

    fn rec(phase: usize, ms: u64, outcome: Outcome) -> Record {
        let started = Instant::now();
        Record {
            phase,
            kind: Kind::Unary,
            started,
            ended: started + Duration::from_millis(ms),
            outcome,
        }
    }

    #[test]
    fn tallies_count_failures_by_code_apart_from_what_was_meant() {
        let records = [
            rec(0, 100, Outcome::Ok),
            rec(0, 300, Outcome::Ok),
            rec(0, 200, Outcome::Ok),
            rec(0, 5, Outcome::Failed(Code::Unavailable, "gone".into())),
            rec(0, 5, Outcome::Failed(Code::Unavailable, "gone".into())),
            rec(0, 5, Outcome::Cancelled),
            rec(0, 5, Outcome::DeadlineHit),
        ];
        let t = Tally::of(&records);
        assert_eq!((t.sent, t.ok, t.cancelled, t.deadline), (7, 3, 1, 1));
        assert_eq!(t.failures(), 2);
        assert_eq!(t.failed_cell(), "2 Unavailable");
        assert_eq!(t.quantile(0.5), Some(0.2));
        assert_eq!(t.quantile(0.99), Some(0.3));
        assert_eq!(Tally::default().quantile(0.5), None);
    }
}
