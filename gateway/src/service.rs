//! `sd.v1.Generation`: the public API, with admission control, deadlines,
//! draining, tracing and metrics around the step loop.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use sd_proto::v1::generation_server::Generation;
use sd_proto::v1::{
    generate_event, GenerateEvent, GenerateRequest, GenerateResponse, Job, JobRequest,
    ListControlNetsRequest, ListControlNetsResponse, ListIpAdaptersRequest, ListIpAdaptersResponse,
    ListJobsRequest, ListJobsResponse, ListLorasRequest, ListLorasResponse, ListModelsRequest,
    ListModelsResponse, ModelInfo, Preview, Progress, SubmitJobRequest,
};
use sd_runtime::admission::{Admission, Slot};
use sd_runtime::deadline::Deadline;
use sd_runtime::lifecycle::{InFlight, Lifecycle};
use sd_runtime::metrics::Metrics;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::blocking::{off_thread, INLINE_BYTES};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::pipeline::{Event, Generator, Stop};
use crate::plan::Plan;

pub struct GenerationService {
    /// The default model (requests that name none).
    pub generator: Generator,
    /// More models behind this gateway, each with its own stage pools
    /// (`--model-route`); a request's `model` picks one by name or id.
    pub others: Vec<Generator>,
    pub limits: Arc<Limits>,
    pub admission: Admission,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    /// Log prompts at info level (off by default: prompts can be private).
    pub log_prompts: bool,
    /// API keys (none: open).
    pub keys: crate::auth::ApiKeys,
    /// The async job store (`--redis`; none: jobs are not served).
    pub jobs: Option<crate::queue::Shared>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

/// What a generation holds while it runs: its place in the drain count and
/// its admission slot (both freed on drop, also when the client goes away).
struct Admitted {
    _work: InFlight,
    _slot: Slot,
}

fn request_span(method: &str) -> tracing::Span {
    tracing::info_span!(
        "generate",
        method,
        trace_id = tracing::field::Empty,
        seed = tracing::field::Empty,
        steps = tracing::field::Empty,
        scheduler = tracing::field::Empty,
        images = tracing::field::Empty,
        size = tracing::field::Empty,
    )
}

impl GenerationService {
    /// Every model served, the default first.
    pub fn models(&self) -> impl Iterator<Item = &Generator> {
        std::iter::once(&self.generator).chain(&self.others)
    }

    /// The model `name` (its name or id; empty: the default), or
    /// INVALID_ARGUMENT listing what is served.
    pub fn pick(&self, name: &str) -> Result<&Generator> {
        if name.is_empty() {
            return Ok(&self.generator);
        }
        self.models()
            .find(|g| g.facts.name == name || g.facts.id == name)
            .ok_or_else(|| {
                let served: Vec<String> = self
                    .models()
                    .map(|g| format!("`{}`", g.facts.name))
                    .collect();
                Error::unknown_model(name, &served.join(", "))
            })
    }

    /// Validate (for the model the request names), then admit (or refuse
    /// at once with RESOURCE_EXHAUSTED), waiting in the queue no longer than
    /// the deadline.
    async fn admit(
        &self,
        req: GenerateRequest,
        deadline: &Deadline,
    ) -> Result<(Plan, Admitted, Generator)> {
        let work = self.lifecycle.begin()?;
        let generator = self.pick(&req.model)?.clone();
        let plan = {
            let (facts, limits) = (generator.facts.clone(), self.limits.clone());
            let small = req.init_image.len() <= INLINE_BYTES;
            off_thread(small, move || Plan::new(req, &facts, &limits)).await?
        };
        let span = tracing::Span::current();
        span.record("seed", plan.seed);
        span.record("steps", plan.steps);
        span.record("scheduler", plan.scheduler.name());
        span.record("images", plan.num_images);
        span.record("size", format!("{}x{}", plan.width, plan.height).as_str());
        if self.log_prompts {
            tracing::info!(prompt = %plan.prompt, negative_prompt = %plan.negative_prompt, "request");
        } else {
            tracing::debug!(prompt = %plan.prompt, negative_prompt = %plan.negative_prompt, "request");
        }
        self.metrics
            .queue_depth
            .set(self.admission.queued() as i64 + 1);
        check_step_fits(&plan, deadline)?;
        let admit = self
            .admission
            .admit_costing(plan.predicted_seconds.unwrap_or(0.0));
        let slot =
            match deadline.instant() {
                Some(at) => tokio::time::timeout_at(at, admit).await.map_err(|_| {
                    Error::DeadlinePassed {
                        when: "while queued".into(),
                    }
                })??,
                None => admit.await?,
            };
        self.metrics.queue_depth.set(self.admission.queued() as i64);
        Ok((
            plan,
            Admitted {
                _work: work,
                _slot: slot,
            },
            generator,
        ))
    }
}

/// A generation asked for over HTTP: what it brings beyond the request.
pub struct HttpCall {
    /// The `authorization` header, checked as gRPC checks its metadata.
    pub authorization: Option<String>,
    pub deadline: Deadline,
    /// Progress and previews, as GenerateStream sends them.
    pub events: Option<mpsc::Sender<Event>>,
    /// Stop early and answer with the image so far.
    pub stop: Option<Stop>,
}

impl GenerationService {
    /// One generation for the HTTP front door, through the same keys,
    /// validation, admission, deadline, tracing and metrics as `Generate`
    /// (counted as `method` in the metrics).
    pub async fn generate_http(
        &self,
        method: &'static str,
        req: GenerateRequest,
        call: HttpCall,
    ) -> Result<GenerateResponse, Status> {
        self.keys
            .check_authorization(call.authorization.as_deref())
            .map_err(Status::from)?;
        let span = request_span(method);
        let deadline = call.deadline;
        let work = async {
            let (plan, _admitted, generator) = self.admit(req, &deadline).await?;
            let run = generator.run_stoppable(plan, call.events, call.stop, deadline);
            within(deadline, run).await
        };
        self.metrics.observe(method, work.instrument(span)).await
    }
}

impl GenerationService {
    /// Run a queued job's generation (its caller was checked when it was
    /// queued) through the same admission, tracing and metrics as the rest.
    pub async fn run_job(
        &self,
        req: GenerateRequest,
        events: mpsc::Sender<Event>,
        deadline: Deadline,
        replay: Option<crate::pipeline::Replay>,
    ) -> Result<GenerateResponse, Status> {
        let span = request_span("Job");
        let work = async {
            let (mut plan, _admitted, generator) = self.admit(req, &deadline).await?;
            plan.replay = replay;
            within(deadline, generator.run(plan, Some(events), deadline)).await
        };
        self.metrics.observe("Job", work.instrument(span)).await
    }

    /// The job store, or UNIMPLEMENTED.
    fn job_store(&self) -> Result<&crate::queue::Shared, Status> {
        self.jobs.as_ref().ok_or_else(crate::queue::doors::unserved)
    }

    /// The caller's identity as the job store keys it.
    fn job_owner(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        self.keys
            .owner(metadata.get("authorization").and_then(|v| v.to_str().ok()))
            .map_err(Status::from)
    }
}

/// Refuse at once a request whose deadline is shorter than one of its UNet
/// steps is predicted to take: a forward, once started, runs to its end, so
/// it would only hold the denoiser for a caller already gone.
fn check_step_fits(plan: &Plan, deadline: &Deadline) -> Result<()> {
    let (Some(per_step), Some(left)) = (plan.predicted_step_seconds, deadline.remaining()?) else {
        return Ok(());
    };
    if per_step > left.as_secs_f64() {
        return Err(Error::DeadlinePassed {
            when: format!(
                "before starting: one step is predicted to take {per_step:.1} s, {:.1} s left",
                left.as_secs_f64()
            ),
        });
    }
    Ok(())
}

/// Run `f` until the deadline, then DEADLINE_EXCEEDED.
async fn within<T>(
    deadline: Deadline,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T, Status> {
    let out = match deadline.instant() {
        Some(at) => tokio::time::timeout_at(at, f).await.unwrap_or_else(|_| {
            Err(Error::DeadlinePassed {
                when: "mid-generation".into(),
            })
        }),
        None => f.await,
    };
    out.map_err(Status::from)
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        self.keys.check(request.metadata()).map_err(Status::from)?;
        let span = request_span("Generate");
        sd_runtime::telemetry::adopt(&request, &span);
        let deadline = Deadline::from_metadata(request.metadata());
        let work = async {
            let (plan, _admitted, generator) = self.admit(request.into_inner(), &deadline).await?;
            within(deadline, generator.run(plan, None, deadline)).await
        };
        let out = self
            .metrics
            .observe("Generate", work.instrument(span))
            .await?;
        Ok(Response::new(out))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.keys.check(request.metadata()).map_err(Status::from)?;
        let span = request_span("GenerateStream");
        sd_runtime::telemetry::adopt(&request, &span);
        let deadline = Deadline::from_metadata(request.metadata());
        let (plan, admitted, generator) = self
            .admit(request.into_inner(), &deadline)
            .instrument(span.clone())
            .await
            .map_err(Status::from)
            .inspect_err(|s| {
                self.metrics
                    .record("GenerateStream", std::time::Duration::ZERO, s.code())
            })?;
        let (tx, rx) = mpsc::channel::<Result<GenerateEvent, Status>>(16);
        let (events_tx, mut events_rx) = mpsc::channel::<Event>(16);
        let metrics = self.metrics.clone();
        // Forward progress events to the client as they come.
        let forward_tx = tx.clone();
        let forward = tokio::spawn(async move {
            while let Some(e) = events_rx.recv().await {
                let event = match e {
                    Event::Progress {
                        step,
                        total,
                        timestep,
                        elapsed,
                    } => generate_event::Event::Progress(Progress {
                        step,
                        total,
                        timestep,
                        elapsed_seconds: elapsed,
                    }),
                    Event::Preview { step, images } => {
                        generate_event::Event::Preview(Preview { step, images })
                    }
                };
                if forward_tx
                    .send(Ok(GenerateEvent { event: Some(event) }))
                    .await
                    .is_err()
                {
                    break; // client gone: dropping events_rx stops the generation
                }
            }
        });
        tokio::spawn(
            async move {
                let _admitted = admitted;
                let run = within(deadline, generator.run(plan, Some(events_tx), deadline));
                let result = metrics.observe("GenerateStream", run).await;
                let _ = forward.await;
                let msg = result.map(|r| GenerateEvent {
                    event: Some(generate_event::Event::Result(r)),
                });
                let _ = tx.send(msg).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let owner = self.job_owner(request.metadata())?;
        let jobs = self.job_store()?;
        let req = request.into_inner();
        let Some(generate) = req.request else {
            return Err(Error::invalid("request", "required: the generation to queue").into());
        };
        self.check(&generate).await?;
        let new = crate::queue::NewJob {
            request: generate,
            webhook_url: req.webhook_url,
            idempotency_key: req.idempotency_key,
        };
        let (id, _) = jobs
            .submit(&owner, new)
            .await
            .map_err(crate::queue::doors::refused)?;
        let job = jobs.owned(&id, &owner, false).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn get_job(&self, request: Request<JobRequest>) -> Result<Response<Job>, Status> {
        let owner = self.job_owner(request.metadata())?;
        let id = request.into_inner().id;
        let job = self.job_store()?.owned(&id, &owner, true).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn cancel_job(&self, request: Request<JobRequest>) -> Result<Response<Job>, Status> {
        use crate::queue::store::Cancelled;
        let owner = self.job_owner(request.metadata())?;
        let id = request.into_inner().id;
        let jobs = self.job_store()?;
        let store_error = |e: redis::RedisError| crate::queue::doors::store_error(&e);
        match jobs.store.cancel(&id, &owner).await.map_err(store_error)? {
            Cancelled::Missing => return Err(crate::queue::doors::not_found(&id)),
            Cancelled::Finished(s) if s != crate::queue::Status::Cancelled => {
                return Err(Status::failed_precondition(format!(
                    "job {id} is already {}",
                    s.as_str()
                )))
            }
            _ => {}
        }
        let job = jobs.owned(&id, &owner, false).await?;
        Ok(Response::new(job.to_proto()))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use crate::queue::doors::{final_event, watch, Watched};
        let owner = self.job_owner(request.metadata())?;
        let id = request.into_inner().id;
        let jobs = self.job_store()?.clone();
        jobs.owned(&id, &owner, false).await?;
        let watched = watch(jobs, id);
        let stream = ReceiverStream::new(watched).map(|w| match w? {
            Watched::Step(e) => Ok(e),
            Watched::End(job) => final_event(&job),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let owner = self.job_owner(request.metadata())?;
        let req = request.into_inner();
        let status = sd_proto::v1::JobStatus::try_from(req.status).map_err(|_| {
            Error::invalid("status", format_args!("{}: no such status", req.status))
        })?;
        let status = crate::queue::Status::from_proto(status);
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(1000)
        } as usize;
        let jobs = self
            .job_store()?
            .store
            .list(&owner, status, limit)
            .await
            .map_err(|e| crate::queue::doors::store_error(&e))?;
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.iter().map(crate::queue::Job::to_proto).collect(),
        }))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.keys.check(request.metadata()).map_err(Status::from)?;
        let models = self
            .models()
            .map(|g| {
                let f = &g.facts;
                let side = f.default_side();
                ModelInfo {
                    default_guidance: f.profile.default_guidance,
                    default_steps: if f.profile.default_steps > 0 {
                        f.profile.default_steps
                    } else {
                        crate::plan::DEFAULT_STEPS
                    },
                    family: f.profile.name(),
                    id: f.id.clone(),
                    name: f.name.clone(),
                    default_width: side,
                    default_height: side,
                    default_scheduler: f.default_scheduler.name().to_string(),
                    prediction_type: f.prediction.as_str().to_string(),
                    example_prompts: f.profile.example_prompts.clone(),
                }
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn list_loras(
        &self,
        request: Request<ListLorasRequest>,
    ) -> Result<Response<ListLorasResponse>, Status> {
        self.keys.check(request.metadata()).map_err(Status::from)?;
        let deadline = Deadline::from_metadata(request.metadata());
        let req = request.into_inner();
        crate::plan::check_loras(&req.check).map_err(Status::from)?;
        let out = self
            .pick(&req.model)
            .map_err(Status::from)?
            .stages
            .list_loras(req, &deadline)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(out))
    }

    async fn list_ip_adapters(
        &self,
        request: Request<ListIpAdaptersRequest>,
    ) -> Result<Response<ListIpAdaptersResponse>, Status> {
        self.keys.check(request.metadata()).map_err(Status::from)?;
        let deadline = Deadline::from_metadata(request.metadata());
        let req = request.into_inner();
        check_names(&req.check)?;
        let out = self
            .pick(&req.model)
            .map_err(Status::from)?
            .stages
            .list_ip_adapters(req, &deadline)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(out))
    }

    async fn list_control_nets(
        &self,
        request: Request<ListControlNetsRequest>,
    ) -> Result<Response<ListControlNetsResponse>, Status> {
        self.keys.check(request.metadata()).map_err(Status::from)?;
        let deadline = Deadline::from_metadata(request.metadata());
        let req = request.into_inner();
        check_names(&req.check)?;
        let generator = self.pick(&req.model).map_err(Status::from)?;
        let out = generator
            .stages
            .list_controlnets(req, &deadline)
            .await
            .map_err(Status::from)?;
        for c in &out.controlnets {
            generator
                .facts
                .cost
                .set_control_ratio(&c.name, c.cost_ratio);
        }
        Ok(Response::new(out))
    }
}

/// A ControlNet or IP-Adapter listing's `check`: at most a request's units.
fn check_names(check: &[String]) -> Result<(), Status> {
    let max = crate::control::MAX_UNITS;
    if check.len() > max {
        return Err(Status::from(Error::invalid(
            "check",
            format!("{} names, at most {max}", check.len()),
        )));
    }
    Ok(())
}
