//! The jobs run's Markdown tables, and what Redis holds per job.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use sd_proto::v1::JobStatus;

use crate::jobs::{Answer, Outcome, Submission};
use crate::report::Phase;

/// What became of a set of submissions.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub submitted: usize,
    pub accepted: usize,
    /// Refusals by gRPC code.
    pub refused: BTreeMap<String, usize>,
    pub completed: usize,
    /// Failed jobs by their error's code.
    pub failed: BTreeMap<String, usize>,
    pub cancelled: usize,
    /// Accepted and not ended when the drain ran out, or unknown to the
    /// store (NOT_FOUND).
    pub lost: usize,
    /// Run more than once (attempts > 1): a gateway died while running it.
    pub taken_over: usize,
    /// Of those, resumed from a checkpoint (steps replayed, not recomputed).
    pub resumed: usize,
    /// Seconds from submission until completion was seen.
    pub latencies: Vec<f64>,
    /// Seconds SubmitJob took to answer (accepted or refused).
    pub submit_latencies: Vec<f64>,
    pub image_bytes: usize,
}

impl Totals {
    pub fn of<'a>(subs: impl IntoIterator<Item = &'a Submission>) -> Totals {
        let mut t = Totals::default();
        for s in subs {
            t.submitted += 1;
            t.submit_latencies.push((s.answered - s.at).as_secs_f64());
            if let Answer::Refused(code, _) = &s.answer {
                *t.refused.entry(format!("{code:?}")).or_default() += 1;
                continue;
            }
            t.accepted += 1;
            let seen = s.seen.as_ref();
            if seen.is_some_and(|j| j.attempts > 1) {
                t.taken_over += 1;
            }
            if seen.is_some_and(|j| j.resumed_from_step > 0) {
                t.resumed += 1;
            }
            match s.status() {
                Some(JobStatus::Completed) => {
                    t.completed += 1;
                    t.latencies.extend(s.latency());
                    t.image_bytes += seen.map_or(0, |j| j.image_bytes);
                }
                Some(JobStatus::Failed) => {
                    let code = seen
                        .and_then(|j| j.error.as_ref())
                        .map_or("unknown".into(), |e| e.0.clone());
                    *t.failed.entry(code).or_default() += 1;
                }
                Some(JobStatus::Cancelled) => t.cancelled += 1,
                _ => t.lost += 1,
            }
        }
        t
    }

    pub fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    /// The `p` quantile of the completion latencies (nearest rank).
    pub fn quantile(&self, p: f64) -> Option<f64> {
        quantile(&self.latencies, p)
    }
}

/// The `p` quantile of `xs` (nearest rank).
fn quantile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// `3 Unavailable, 1 Unknown`, or `0`.
fn by_code(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    m.iter()
        .map(|(c, n)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(d: Option<f64>) -> String {
    d.map_or("–".into(), |s| format!("{s:.2}"))
}

/// Submissions by phase, and what became of the jobs each accepted.
pub fn phases_table(phases: &[Phase], subs: &[Submission]) -> String {
    let mut s = String::from(
        "| phase | s | submitted | submit p99 s | accepted | refused | completed \
         | not completed | taken over | jobs open at the fault | process serving again s |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for (i, p) in phases.iter().enumerate() {
        let t = Totals::of(subs.iter().filter(|r| r.phase == i));
        let (open, back) = p
            .fault
            .as_ref()
            .map_or((String::new(), String::new()), |f| {
                (
                    subs.iter().filter(|s| s.open_at(f.at)).count().to_string(),
                    secs(f.back_after.map(|d| d.as_secs_f64())),
                )
            });
        let _ = writeln!(
            s,
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {open} | {back} |",
            p.name,
            (p.end - p.start).as_secs_f64(),
            t.submitted,
            secs(quantile(&t.submit_latencies, 0.99)),
            t.accepted,
            by_code(&t.refused),
            t.completed,
            t.accepted - t.completed,
            t.taken_over,
        );
    }
    let t = Totals::of(subs);
    let _ = writeln!(
        s,
        "| **all** | | {} | {} | {} | {} | {} | {} | {} | | |",
        t.submitted,
        secs(quantile(&t.submit_latencies, 0.99)),
        t.accepted,
        by_code(&t.refused),
        t.completed,
        t.accepted - t.completed,
        t.taken_over,
    );
    s
}

/// What became of every accepted job, with its latency and its size in
/// Redis.
pub fn totals_table(o: &Outcome) -> String {
    let t = Totals::of(&o.submissions);
    let redis = o
        .redis_bytes
        .as_ref()
        .filter(|b| !b.is_empty())
        .map_or("–".into(), |b| {
            format!(
                "{:.1}",
                b.iter().sum::<u64>() as f64 / b.len() as f64 / 1024.0
            )
        });
    let images = if t.completed == 0 {
        "–".into()
    } else {
        format!("{:.1}", t.image_bytes as f64 / t.completed as f64 / 1024.0)
    };
    let mut s = String::from(
        "| accepted | completed | failed | cancelled | lost | taken over (from a checkpoint) | p50 s | p99 s \
         | drained in s | Redis KiB per completed job | image KiB per job |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let _ = writeln!(
        s,
        "| {} | {} | {} | {} | {} | {} ({}) | {} | {} | {:.1} | {redis} | {images} |",
        t.accepted,
        t.completed,
        by_code(&t.failed),
        t.cancelled,
        t.lost,
        t.taken_over,
        t.resumed,
        secs(t.quantile(0.5)),
        secs(t.quantile(0.99)),
        o.drained_in.as_secs_f64(),
    );
    s
}

/// Each distinct refusal (phase, code, message) and how often it came.
pub fn refusals_table(phases: &[Phase], subs: &[Submission]) -> String {
    let mut seen: BTreeMap<(usize, String, String), usize> = BTreeMap::new();
    for r in subs {
        if let Answer::Refused(code, msg) = &r.answer {
            *seen
                .entry((r.phase, format!("{code:?}"), msg.clone()))
                .or_default() += 1;
        }
    }
    if seen.is_empty() {
        return "No submission refused.\n".into();
    }
    let mut s = String::from("| phase | code | message | n |\n|---|---|---|---:|\n");
    for ((phase, code, msg), n) in seen {
        let name = phases.get(phase).map_or("?", |p| p.name.as_str());
        let msg = msg.replace('|', "\\|");
        let _ = writeln!(s, "| {name} | {code} | {msg} | {n} |");
    }
    s
}

/// Every accepted job that did not complete (the first 30): where it was
/// submitted and what `GetJob` last said.
pub fn unfinished_table(phases: &[Phase], subs: &[Submission]) -> String {
    let rows: Vec<&Submission> = subs
        .iter()
        .filter(|s| s.id().is_some() && s.status() != Some(JobStatus::Completed))
        .collect();
    if rows.is_empty() {
        return "Every accepted job completed.\n".into();
    }
    let mut s = String::from(
        "| phase submitted | request | job | last seen | attempts | error |\n\
         |---|---|---|---|---:|---|\n",
    );
    for r in rows.iter().take(30) {
        let name = phases.get(r.phase).map_or("?", |p| p.name.as_str());
        let (last, attempts, error) = match &r.seen {
            None => ("never answered".to_string(), String::new(), String::new()),
            Some(j) => (
                j.status
                    .map_or("NOT_FOUND".into(), |st| st.as_str_name().to_string()),
                j.attempts.to_string(),
                j.error.as_ref().map_or(String::new(), |(c, m)| {
                    format!("{c}: {m}").replace('|', "\\|")
                }),
            ),
        };
        let _ = writeln!(
            s,
            "| {name} | {:?} | {} | {last} | {attempts} | {error} |",
            r.kind,
            r.id().unwrap_or_default()
        );
    }
    if rows.len() > 30 {
        let _ = writeln!(s, "\n({} more.)", rows.len() - 30);
    }
    s
}

/// `MEMORY USAGE sd:job:ID SAMPLES 0` of each job, over one connection to
/// the Redis at `addr` (`host:port`).
pub fn job_bytes(addr: &str, ids: &[&str]) -> anyhow::Result<Vec<u64>> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::new();
    for id in ids {
        let key = format!("sd:job:{id}");
        let args = ["MEMORY", "USAGE", key.as_str(), "SAMPLES", "0"];
        let _ = write!(out, "*{}\r\n", args.len());
        for a in args {
            let _ = write!(out, "${}\r\n{a}\r\n", a.len());
        }
    }
    conn.write_all(&out)?;
    let mut reader = BufReader::new(conn);
    let mut bytes = Vec::new();
    for _ in ids {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // `:N` for a key; a nil (`$-1`, `_`) for none; `-ERR …`.
        if let Some(n) = line.trim_end().strip_prefix(':') {
            bytes.push(n.parse()?);
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Seen;
    use crate::load::Kind;
    use std::time::Instant;
    use tonic::Code;

    fn sub(answer: Answer, status: Option<Option<JobStatus>>, attempts: u32) -> Submission {
        let at = Instant::now();
        Submission {
            phase: 0,
            kind: Kind::Unary,
            at,
            answered: at,
            answer,
            seen: status.map(|status| Seen {
                at: at + Duration::from_millis(500),
                status,
                attempts,
                resumed_from_step: 0,
                error: (status == Some(JobStatus::Failed))
                    .then(|| ("unavailable".into(), "gone".into())),
                image_bytes: 1000,
            }),
        }
    }

    #[test]
    fn totals_count_lost_apart_from_failed_and_refused() {
        let ok = || Answer::Accepted("j".into());
        let subs = [
            sub(ok(), Some(Some(JobStatus::Completed)), 1),
            sub(ok(), Some(Some(JobStatus::Completed)), 2),
            sub(ok(), Some(Some(JobStatus::Failed)), 5),
            sub(ok(), Some(Some(JobStatus::InProgress)), 1),
            sub(ok(), Some(None), 0),
            sub(ok(), None, 0),
            sub(Answer::Refused(Code::Unavailable, "down".into()), None, 0),
        ];
        let t = Totals::of(&subs);
        assert_eq!((t.submitted, t.accepted, t.completed), (7, 6, 2));
        assert_eq!((t.lost, t.failures(), t.taken_over), (3, 1, 2));
        assert_eq!(by_code(&t.refused), "1 Unavailable");
        assert_eq!(by_code(&t.failed), "1 unavailable");
        assert_eq!(t.quantile(0.5), Some(0.5));
        assert_eq!(t.image_bytes, 2000);
    }
}
