//! What the HTTP and gRPC doors share: checking a job before it is queued,
//! mapping refusals to statuses, and watching a job's events from any
//! gateway.

use std::time::Duration;

use prost::Message;
use sd_proto::v1::{generate_event, GenerateEvent, GenerateRequest, GenerateResponse};
use tokio::sync::mpsc;
use tonic::Status;

use super::{Job, Refused, Shared};
use crate::error::Error;
use crate::service::GenerationService;

/// The status a refused submission gets.
pub fn refused(r: Refused) -> Status {
    match r {
        Refused::Invalid(field, message) => Error::invalid(field, message).into(),
        Refused::Full { per_key } => Status::resource_exhausted(if per_key {
            "this API key has as many jobs queued as it may (--max-queued-jobs-per-key); \
             retry when some have run"
        } else {
            "the job queue is full (--max-queued-jobs); retry later"
        }),
        Refused::Store(e) => Status::unavailable(format!("the job store is unreachable: {e}")),
        Refused::StoreFull => {
            Status::resource_exhausted("the job store is out of memory; retry later")
        }
    }
}

pub fn store_error(e: &redis::RedisError) -> Status {
    Status::unavailable(format!("the job store is unreachable: {e}"))
}

pub fn unserved() -> Status {
    Status::unimplemented("this gateway runs no async jobs: start it with --redis URL")
}

pub fn not_found(id: &str) -> Status {
    Status::not_found(format!("no job {id}"))
}

impl super::Jobs {
    /// Job `id` if `owner`'s (with its images when `with_result`), else
    /// NOT_FOUND as for an unknown one; UNAVAILABLE when the store is away.
    pub async fn owned(&self, id: &str, owner: &str, with_result: bool) -> Result<Job, Status> {
        self.store
            .get(id, Some(owner), with_result)
            .await
            .map_err(|e| store_error(&e))?
            .ok_or_else(|| not_found(id))
    }
}

impl GenerationService {
    /// Check a job's request as a synchronous generation is checked (the
    /// model, every field, the images), so that nothing invalid is queued.
    pub async fn check(&self, req: &GenerateRequest) -> Result<(), Status> {
        let generator = self.pick(&req.model).map_err(Status::from)?;
        let (facts, limits) = (generator.facts.clone(), self.limits.clone());
        let req = req.clone();
        let small = req.init_image.len() <= crate::blocking::INLINE_BYTES;
        crate::blocking::off_thread(small, move || {
            crate::plan::Plan::new(req, &facts, &limits).map(|_| ())
        })
        .await
        .map_err(Status::from)
    }
}

/// What a watcher sees.
pub enum Watched {
    /// A step's progress or preview.
    Step(GenerateEvent),
    /// The job finished (read with its images).
    End(Job),
}

/// Follow job `id` (already checked to be the caller's) until it finishes:
/// its events as the running gateway records them, wherever it runs.
pub fn watch(jobs: Shared, id: String) -> mpsc::Receiver<Result<Watched, Status>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut last = "0".to_string();
        let mut polls = 0u32;
        loop {
            match jobs.store.events(&id, &last).await {
                Ok(evs) => {
                    for (eid, ev) in evs {
                        last = eid;
                        match ev {
                            super::store::Event::Step(bytes) => {
                                if let Ok(e) = GenerateEvent::decode(bytes.as_slice()) {
                                    if tx.send(Ok(Watched::Step(e))).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            super::store::Event::End(_) => {
                                let _ = tx.send(end(&jobs, &id).await).await;
                                return;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(job = %id, "events not read: {e}"),
            }
            // The job's own status, now and then (its events expire, and a
            // job cancelled while queued has none).
            polls += 1;
            if polls % 10 == 1 {
                match jobs.store.get(&id, None, false).await {
                    Ok(Some(j)) if j.status.terminal() => {
                        let _ = tx.send(end(&jobs, &id).await).await;
                        return;
                    }
                    Ok(None) => {
                        let _ = tx.send(Err(not_found(&id))).await;
                        return;
                    }
                    _ => {}
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    rx
}

async fn end(jobs: &Shared, id: &str) -> Result<Watched, Status> {
    match jobs.store.get(id, None, true).await {
        Ok(Some(j)) => Ok(Watched::End(j)),
        Ok(None) => Err(not_found(id)),
        Err(e) => Err(store_error(&e)),
    }
}

/// A finished job as the last message of a gRPC stream: its result, or its
/// error as the stream's status.
pub fn final_event(job: &Job) -> Result<GenerateEvent, Status> {
    match job.status {
        super::Status::Completed => {
            let r = job
                .result
                .as_deref()
                .and_then(|r| GenerateResponse::decode(r).ok())
                .ok_or_else(|| Status::internal("the job's result could not be read"))?;
            Ok(GenerateEvent {
                event: Some(generate_event::Event::Result(r)),
            })
        }
        super::Status::Cancelled => Err(Status::cancelled(format!("job {} was cancelled", job.id))),
        _ => {
            let (code, message) = job
                .error
                .as_ref()
                .map_or(("unknown", ""), |e| (e.code.as_str(), e.message.as_str()));
            Err(Status::new(code_from_name(code), message.to_string()))
        }
    }
}

/// `invalid_argument` → `Code::InvalidArgument` (the inverse of
/// [`super::code_name`]).
pub fn code_from_name(name: &str) -> tonic::Code {
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| super::code_name(*c) == name)
        .unwrap_or(tonic::Code::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_round_trip() {
        for c in [
            tonic::Code::InvalidArgument,
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Internal,
        ] {
            assert_eq!(code_from_name(&super::super::code_name(c)), c);
        }
        assert_eq!(code_from_name("nonsense"), tonic::Code::Unknown);
    }
}
