//! AUTOMATIC1111's progress and interrupt over the jobs running through the
//! `/sdapi/v1` routes. A1111 has one global job; here each caller (its API
//! key, or everyone alike when the gateway has no keys) sees and
//! interrupts its own running jobs — with no keys that is A1111's global
//! behaviour.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::body::Bytes;

use crate::pipeline::Stop;

/// Who runs a job: a digest of the caller's API key, or no one in
/// particular when the gateway takes none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Caller(pub Option<u64>);

/// A running txt2img/img2img request: `job_count` iterations (A1111's
/// `n_iter`), each `batch` images generated at once.
pub struct Job {
    pub caller: Caller,
    pub stop: Stop,
    started: Instant,
    /// A1111's `job_timestamp`: when it started, `YYYYMMDDhhmmss` (UTC).
    pub timestamp: String,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    job_count: u32,
    job_no: u32,
    /// Steps done by each generation of the current iteration.
    done: Vec<u32>,
    steps: u32,
    /// The latest latent preview (PNG).
    preview: Option<Bytes>,
}

/// What `/sdapi/v1/progress` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub progress: f64,
    pub eta_relative: f64,
    pub job_count: u32,
    pub job_no: u32,
    pub sampling_step: u32,
    pub sampling_steps: u32,
    pub interrupted: bool,
    pub timestamp: String,
    pub preview: Option<Bytes>,
}

impl Job {
    /// Iteration `job_no` begins, with `batch` generations of `steps` steps.
    pub fn iteration(&self, job_no: u32, batch: usize, steps: u32) {
        let mut s = self.lock();
        s.job_no = job_no;
        s.done = vec![0; batch];
        s.steps = steps;
    }

    /// Generation `index` of the current iteration finished `step` of `total`.
    pub fn step(&self, index: usize, step: u32, total: u32) {
        let mut s = self.lock();
        if let Some(d) = s.done.get_mut(index) {
            *d = step;
        }
        s.steps = total;
    }

    pub fn preview(&self, png: Bytes) {
        self.lock().preview = Some(png);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A1111's arithmetic: iterations done plus the current one's share.
    pub fn progress(&self) -> Progress {
        let s = self.lock().clone();
        let step = s.done.iter().copied().min().unwrap_or(0);
        let mut p = 0.0;
        if s.job_count > 0 {
            p += f64::from(s.job_no) / f64::from(s.job_count);
            if s.steps > 0 {
                p += f64::from(step) / f64::from(s.steps) / f64::from(s.job_count);
            }
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta_relative = if p > 0.0 { elapsed / p - elapsed } else { 0.0 };
        Progress {
            progress: p.min(1.0),
            eta_relative: eta_relative.max(0.0),
            job_count: s.job_count,
            job_no: s.job_no,
            sampling_step: step,
            sampling_steps: s.steps,
            interrupted: self.stop.stopped(),
            timestamp: self.timestamp.clone(),
            preview: s.preview,
        }
    }
}

/// The running jobs, oldest first.
#[derive(Default)]
pub struct Jobs {
    running: Mutex<Vec<Arc<Job>>>,
}

/// A job's place in [`Jobs`]; dropping it ends the job.
pub struct Running {
    jobs: Arc<Jobs>,
    pub job: Arc<Job>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut r = self.jobs.lock();
        r.retain(|j| !Arc::ptr_eq(j, &self.job));
    }
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Job>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a job of `job_count` iterations for `caller`.
    pub fn start(self: &Arc<Self>, caller: Caller, job_count: u32) -> Running {
        let job = Arc::new(Job {
            caller,
            stop: Stop::new(),
            started: Instant::now(),
            timestamp: timestamp(SystemTime::now()),
            state: Mutex::new(State {
                job_count,
                ..State::default()
            }),
        });
        self.lock().push(job.clone());
        Running {
            jobs: self.clone(),
            job,
        }
    }

    /// The caller's most recent running job.
    pub fn current(&self, caller: &Caller) -> Option<Arc<Job>> {
        self.lock()
            .iter()
            .rev()
            .find(|j| &j.caller == caller)
            .cloned()
    }

    /// Stop the caller's running jobs after their current step; how many.
    pub fn interrupt(&self, caller: &Caller) -> usize {
        let r = self.lock();
        let mine: Vec<_> = r.iter().filter(|j| &j.caller == caller).collect();
        for j in &mine {
            j.stop.stop();
        }
        mine.len()
    }
}

/// `YYYYMMDDhhmmss` in UTC, as A1111's `job_timestamp`.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// days-to-civil algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn progress_is_iterations_done_plus_the_current_share() {
        let jobs = Arc::new(Jobs::default());
        let me = Caller(Some(1));
        let running = jobs.start(me.clone(), 2);
        let job = jobs.current(&me).unwrap();
        job.iteration(0, 2, 10);
        job.step(0, 5, 10);
        job.step(1, 3, 10);
        // The slower of the batch counts: 3 of 10 in the first of 2.
        let p = job.progress();
        assert!((p.progress - 0.15).abs() < 1e-9, "{p:?}");
        assert_eq!((p.sampling_step, p.sampling_steps, p.job_count), (3, 10, 2));
        job.iteration(1, 1, 10);
        job.step(0, 10, 10);
        assert!((job.progress().progress - 1.0).abs() < 1e-9);
        drop(running);
        assert!(jobs.current(&me).is_none());
    }

    #[test]
    fn a_caller_interrupts_only_its_own_jobs() {
        let jobs = Arc::new(Jobs::default());
        let (a, b) = (Caller(Some(1)), Caller(Some(2)));
        let ja = jobs.start(a.clone(), 1);
        let jb = jobs.start(b.clone(), 1);
        assert_eq!(jobs.interrupt(&a), 1);
        assert!(ja.job.stop.stopped());
        assert!(!jb.job.stop.stopped());
        assert!(jobs.current(&b).is_some());
        assert!(jobs.current(&Caller(Some(3))).is_none());
    }

    #[test]
    fn timestamps_are_utc_calendar_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        // 2026-11-18 11:06:40 UTC (Python's datetime.utcfromtimestamp).
        assert_eq!(timestamp(t), "20261118110640");
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "19700101000000");
    }
}
