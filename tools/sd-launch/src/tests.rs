//! Each case runs a small `sh` script standing in for a server.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Whether `pid` still names a process (running or not yet waited for).
fn alive(pid: u32) -> bool {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) with signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn reads_the_address_and_the_metrics_address_before_it() {
    let p = Launch::new("fake")
        .spawn(sh(
            "echo loading; echo 'metrics on 127.0.0.1:9100'; \
             echo 'http on 127.0.0.1:7860'; echo 'listening on 127.0.0.1:1234'; exec sleep 30",
        ))
        .unwrap();
    assert_eq!(p.name(), "fake");
    assert_eq!(p.addr(), "127.0.0.1:1234");
    assert_eq!(p.url(), "http://127.0.0.1:1234");
    assert_eq!(p.port(), Some(1234));
    assert_eq!(p.metrics_addr().as_deref(), Some("127.0.0.1:9100"));
    assert_eq!(p.http_addr().as_deref(), Some("127.0.0.1:7860"));
}

#[test]
fn can_wait_for_a_metrics_address_printed_after_the_address() {
    let p = Launch::new("fake")
        .wait_for_metrics()
        .spawn(sh("echo 'listening on [::1]:7'; sleep 0.2; \
             echo 'metrics on [::1]:8'; exec sleep 30"))
        .unwrap();
    assert_eq!(p.port(), Some(7));
    assert_eq!(p.metrics_addr().as_deref(), Some("[::1]:8"));
}

#[test]
fn a_custom_address_prefix_is_read_instead() {
    let p =
        Launch::new("sdctl up")
            .address_prefix("gateway ready on http://")
            .spawn(sh("echo 'listening on 127.0.0.1:1'; \
             echo 'gateway ready on http://127.0.0.1:50051'; exec sleep 30"))
            .unwrap();
    assert_eq!(p.url(), "http://127.0.0.1:50051");
}

#[test]
fn every_line_can_be_forwarded() {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut p = Launch::new("reporter")
        .forward_lines(tx)
        .spawn(sh("echo 'started a 0'; echo 'listening on 127.0.0.1:1'; \
             sleep 0.1; echo 'started b 1'; exit 0"))
        .unwrap();
    assert!(p.wait_exit(Duration::from_secs(10)).unwrap().is_some());
    let lines: Vec<String> = rx.iter().collect();
    assert_eq!(
        lines,
        ["started a 0", "listening on 127.0.0.1:1", "started b 1"]
    );
}

#[test]
fn a_process_that_exits_before_listening_is_an_error_with_its_status() {
    let err = Launch::new("fake")
        .spawn(sh("echo loading; exit 3"))
        .err()
        .unwrap();
    match &err {
        LaunchError::ExitedEarly { name, status } => {
            assert_eq!(name, "fake");
            assert_eq!(status.code(), Some(3));
        }
        other => panic!("expected ExitedEarly, got {other:?}"),
    }
    assert!(err.to_string().contains("before listening"), "{err}");
}

#[test]
fn a_silent_process_times_out_and_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let t = Instant::now();
    let err = Launch::new("fake")
        .timeout(Duration::from_secs(1))
        .spawn(sh(&script))
        .err()
        .unwrap();
    assert!(
        matches!(err, LaunchError::Timeout { ref name, .. } if name == "fake"),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid), "the timed-out process was left running");
}

#[test]
fn a_process_that_closes_stdout_but_runs_on_is_an_error() {
    let err = Launch::new("fake")
        .timeout(Duration::from_secs(1))
        .spawn(sh("exec >&-; exec sleep 30"))
        .err()
        .unwrap();
    assert!(matches!(err, LaunchError::ClosedStdout { .. }), "{err:?}");
}

#[test]
fn a_missing_binary_is_a_spawn_error() {
    let err = Launch::new("nothing")
        .spawn(Command::new("/nonexistent/sd-nothing"))
        .err()
        .unwrap();
    assert!(matches!(err, LaunchError::Spawn { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot start nothing (/nonexistent/sd-nothing)"
    );
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert!(source.is_some_and(|s| s.contains("No such file")));
}

#[test]
fn stdout_keeps_being_drained_after_the_address() {
    // ~1.4 MB after the address: far more than a pipe holds, so the script
    // only gets to exit if someone keeps reading.
    let mut p = Launch::new("chatty")
        .spawn(sh(
            "echo 'listening on 127.0.0.1:1'; yes | head -n 700000; exit 0",
        ))
        .unwrap();
    let status = p.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn signal_and_wait_exit() {
    let mut p = Launch::new("fake")
        .spawn(sh("echo 'listening on 127.0.0.1:1'; exec sleep 30"))
        .unwrap();
    assert_eq!(p.try_wait().unwrap(), None);
    assert_eq!(p.wait_exit(Duration::from_millis(50)).unwrap(), None);
    p.signal(libc::SIGTERM).unwrap();
    let status = p.wait_exit(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    let again = p.signal(libc::SIGTERM).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::ESRCH));
}

#[test]
fn dropping_kills_the_process() {
    let p = Launch::new("fake")
        .spawn(sh(
            "echo 'listening on 127.0.0.1:1'; trap '' TERM; exec sleep 30",
        ))
        .unwrap();
    let pid = p.id();
    assert!(alive(pid));
    drop(p);
    assert!(!alive(pid), "still running after drop");
}

/// Exits 7 on SIGTERM (after the running `sleep`, as sh runs traps).
const TERM_EXITS_7: &str =
    "trap 'exit 7' TERM; echo 'listening on 127.0.0.1:1'; while :; do sleep 0.05; done";
/// Ignores SIGTERM.
const TERM_IGNORED: &str =
    "trap '' TERM; echo 'listening on 127.0.0.1:1'; while :; do sleep 0.05; done";

#[test]
fn terminate_lets_the_process_exit_on_sigterm() {
    let mut p = Launch::new("polite")
        .stop(Stop::Terminate {
            grace: Duration::from_secs(10),
        })
        .spawn(sh(TERM_EXITS_7))
        .unwrap();
    let stopped = p.stop().unwrap();
    assert!(matches!(stopped, Stopped::Exited(_)), "{stopped:?}");
    assert_eq!(stopped.status().code(), Some(7));
    // Stopping again reports the same end without signalling anyone.
    assert_eq!(p.stop().unwrap(), stopped);
}

#[test]
fn terminate_kills_after_the_grace_period() {
    let mut p = Launch::new("stubborn")
        .stop(Stop::Terminate {
            grace: Duration::from_millis(300),
        })
        .spawn(sh(TERM_IGNORED))
        .unwrap();
    let stopped = p.stop().unwrap();
    assert!(matches!(stopped, Stopped::Killed(_)), "{stopped:?}");
    assert_eq!(stopped.status().signal(), Some(libc::SIGKILL));
}

#[test]
fn stop_all_runs_the_grace_periods_together() {
    let grace = Duration::from_secs(1);
    let mut procs: Vec<Process> = [TERM_IGNORED, TERM_EXITS_7, TERM_IGNORED]
        .iter()
        .map(|s| {
            Launch::new("p")
                .stop(Stop::Terminate { grace })
                .spawn(sh(s))
                .unwrap()
        })
        .collect();
    let t = Instant::now();
    let stopped: Vec<Stopped> = stop_all(&mut procs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // One after the other would take 2 s for the two stubborn ones.
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(stopped[0], Stopped::Killed(_)), "{stopped:?}");
    assert_eq!(stopped[1], Stopped::Exited(stopped[1].status()));
    assert_eq!(stopped[1].status().code(), Some(7));
    assert!(matches!(stopped[2], Stopped::Killed(_)), "{stopped:?}");
}
