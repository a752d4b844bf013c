//! What a process holds, from /proc: resident memory, threads, open files.

use std::time::Instant;

/// One look at one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// VmRSS, KiB.
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

impl Usage {
    /// Read /proc/PID; None if the process is gone.
    pub fn of(pid: u32) -> Option<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        Some(Usage {
            rss_kib: field("VmRSS:")?,
            threads: field("Threads:")?,
            fds,
        })
    }

    /// `123.4 MB / 12 thr / 30 fd`.
    pub fn cell(&self) -> String {
        format!(
            "{:.1} MB / {} thr / {} fd",
            self.rss_kib as f64 / 1024.0,
            self.threads,
            self.fds
        )
    }
}

/// The usage of every process of the stack at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    /// What the moment was (a phase's end, a call count).
    pub label: String,
    /// (process label, pid, usage); a process that was not running has none.
    pub rows: Vec<(String, u32, Option<Usage>)>,
}

impl Snapshot {
    /// Usage of each `(label, pid)` now.
    pub fn take(label: String, procs: &[(String, u32)]) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            label,
            rows: procs
                .iter()
                .map(|(l, pid)| (l.clone(), *pid, Usage::of(*pid)))
                .collect(),
        }
    }

    pub fn usage(&self, process: &str) -> Option<Usage> {
        self.rows
            .iter()
            .find(|(l, _, _)| l == process)
            .and_then(|(_, _, u)| *u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_usage() {
        let u = Usage::of(std::process::id()).expect("this process");
        assert!(u.rss_kib > 0 && u.threads >= 1 && u.fds >= 3, "{u:?}");
        let f = std::fs::File::open("/proc/self/status").expect("open");
        let more = Usage::of(std::process::id()).expect("this process");
        assert!(more.fds > u.fds, "{more:?} after opening one more file");
        drop(f);
        assert_eq!(Usage::of(u32::MAX), None);
    }
}
