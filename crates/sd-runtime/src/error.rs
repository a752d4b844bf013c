//! Why the serving plumbing refuses work, with its one map to gRPC codes.

use tonic::Status;

/// Work refused before it starts (or stopped because time ran out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Every slot is busy and the queue is full.
    #[error("{what}: all slots busy and the queue ({max_queue}) is full; retry later")]
    Overloaded {
        what: &'static str,
        max_queue: usize,
    },
    /// The work already waiting is predicted to take too long.
    #[error("{what}: {queued_seconds} s of predicted work would be waiting, at most {max_seconds} s; retry later")]
    Backlog {
        what: &'static str,
        queued_seconds: u64,
        max_seconds: u64,
    },
    /// The process is draining (SIGTERM) or its queue closed.
    #[error("shutting down: not accepting new work")]
    ShuttingDown,
    /// The caller's deadline passed.
    #[error("the client's deadline passed")]
    DeadlinePassed,
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        let message = r.to_string();
        match r {
            Refusal::Overloaded { .. } | Refusal::Backlog { .. } => {
                Status::resource_exhausted(message)
            }
            // UNAVAILABLE: clients and the gateway try another replica.
            Refusal::ShuttingDown => Status::unavailable(message),
            Refusal::DeadlinePassed => Status::deadline_exceeded(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_refusal_has_its_code() {
        let cases = [
            (
                Refusal::Overloaded {
                    what: "gateway",
                    max_queue: 4,
                },
                Code::ResourceExhausted,
            ),
            (
                Refusal::Backlog {
                    what: "gateway",
                    queued_seconds: 700,
                    max_seconds: 600,
                },
                Code::ResourceExhausted,
            ),
            (Refusal::ShuttingDown, Code::Unavailable),
            (Refusal::DeadlinePassed, Code::DeadlineExceeded),
        ];
        for (r, code) in cases {
            assert_eq!(Status::from(r).code(), code);
        }
    }
}
