//! `sd.v1.Generation`: the public API.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sd_proto::v1::generation_server::Generation;
use sd_proto::v1::{
    generate_event, GenerateEvent, GenerateRequest, GenerateResponse, ListModelsRequest,
    ListModelsResponse, ModelInfo, Preview, Progress,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::pipeline::{Event, Generator};
use crate::plan::{Limits, Plan};

pub struct GenerationService {
    pub generator: Generator,
    pub limits: Arc<Limits>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

impl GenerationService {
    fn plan(&self, req: GenerateRequest) -> Result<Plan, Status> {
        Plan::new(req, &self.generator.facts, &self.limits)
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let plan = self.plan(request.into_inner())?;
        Ok(Response::new(self.generator.run(plan, None).await?))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let plan = self.plan(request.into_inner())?;
        let (tx, rx) = mpsc::channel::<Result<GenerateEvent, Status>>(16);
        let (events_tx, mut events_rx) = mpsc::channel::<Event>(16);
        let generator = self.generator.clone();
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
        tokio::spawn(async move {
            let result = generator.run(plan, Some(events_tx)).await;
            let _ = forward.await;
            let msg = result.map(|r| GenerateEvent {
                event: Some(generate_event::Event::Result(r)),
            });
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let f = &self.generator.facts;
        let side = f.sample_size * f.scale_factor;
        Ok(Response::new(ListModelsResponse {
            models: vec![ModelInfo {
                id: f.id.clone(),
                name: f.name.clone(),
                default_width: side,
                default_height: side,
                default_scheduler: f.default_scheduler.name().to_string(),
                prediction_type: f.prediction_type.clone(),
            }],
        }))
    }
}
