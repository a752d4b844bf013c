//! A thread that reads a server's stdout for as long as it runs: it reports
//! the address lines while the launcher waits for them, and afterwards only
//! drains, so the server never blocks writing to a full pipe.

use std::io::{self, BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use crate::{HTTP, METRICS};

/// What the launcher hears from the reader thread.
pub(crate) enum Line {
    /// The address line, prefix stripped.
    Address(String),
    /// A `metrics on ADDR` line (the address is in [`Watch::metrics`]).
    Metrics,
    /// Stdout reached its end (the process closed it or exited).
    Closed,
}

/// What the reader thread has seen that outlives the launch.
#[derive(Clone, Default)]
pub(crate) struct Watch {
    metrics: Arc<Mutex<Option<String>>>,
    http: Arc<Mutex<Option<String>>>,
}

impl Watch {
    /// The last `metrics on ADDR` address printed, if any.
    pub(crate) fn metrics(&self) -> Option<String> {
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last `http on ADDR` address printed, if any.
    pub(crate) fn http(&self) -> Option<String> {
        self.http
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_metrics(&self, addr: String) {
        *self.metrics.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr);
    }
}

/// Start reading `stdout` on a thread of its own; every line also goes to
/// `forward`, when given (sends stop once its receiver is gone).
pub(crate) fn watch(
    stdout: ChildStdout,
    address_prefix: String,
    forward: Option<Sender<String>>,
) -> io::Result<(Watch, Receiver<Line>)> {
    let watch = Watch::default();
    let (tx, rx) = mpsc::channel();
    let seen = watch.clone();
    std::thread::Builder::new()
        .name("sd-launch-stdout".into())
        .spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            // Bytes, not `lines()`: one line of invalid UTF-8 must not stop
            // the draining. Sends fail once the launcher stopped listening,
            // which is expected.
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if let Some(addr) = line.strip_prefix(address_prefix.as_str()) {
                    let _ = tx.send(Line::Address(addr.trim().to_string()));
                } else if let Some(addr) = line.strip_prefix(HTTP) {
                    *seen.http.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(addr.trim().to_string());
                } else if let Some(addr) = line.strip_prefix(METRICS) {
                    seen.set_metrics(addr.trim().to_string());
                    let _ = tx.send(Line::Metrics);
                }
                if let Some(f) = &forward {
                    let _ = f.send(line.to_string());
                }
                buf.clear();
            }
            let _ = tx.send(Line::Closed);
        })?;
    Ok((watch, rx))
}
