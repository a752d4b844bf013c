//! The three model stages as the step loop needs them. The gateway's
//! implementation calls the model services through the replica pools; other
//! implementations (an in-process pipeline for benchmarks) can run the same
//! step loop without gRPC.

use sd_proto::v1::{
    DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse, EncodeTextRequest,
    EncodeTextResponse, PredictRequest, PredictResponse,
};
use sd_runtime::deadline::Deadline;
use sd_runtime::telemetry::inject;
use tonic::Status;

use crate::backends::Backends;

/// Text encoding, one denoising prediction, VAE decode and encode.
#[tonic::async_trait]
pub trait Stages: Send + Sync + 'static {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        deadline: &Deadline,
    ) -> Result<EncodeTextResponse, Status>;
    /// Errors keep their code: FAILED_PRECONDITION with `sd-embedding-miss`
    /// asks for the embeddings again.
    async fn predict(
        &self,
        req: PredictRequest,
        deadline: &Deadline,
    ) -> Result<PredictResponse, Status>;
    async fn decode(
        &self,
        req: DecodeRequest,
        deadline: &Deadline,
    ) -> Result<DecodeResponse, Status>;
    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        deadline: &Deadline,
    ) -> Result<EncodeImageResponse, Status>;
}

/// A request for a model service: the deadline's time left, and the trace context.
fn outgoing<T>(deadline: &Deadline, msg: T) -> Result<tonic::Request<T>, Status> {
    let mut r = deadline.request(msg)?;
    inject(&mut r);
    Ok(r)
}

fn record_replica(url: &str) {
    tracing::Span::current().record("replica", url);
}

#[tonic::async_trait]
impl Stages for Backends {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        deadline: &Deadline,
    ) -> Result<EncodeTextResponse, Status> {
        self.text
            .call(deadline, |ch, url| {
                let req = req.clone();
                async move {
                    record_replica(&url);
                    Ok(self
                        .text_client(ch)
                        .encode(outgoing(deadline, req)?)
                        .await?
                        .into_inner())
                }
            })
            .await
    }

    async fn predict(
        &self,
        req: PredictRequest,
        deadline: &Deadline,
    ) -> Result<PredictResponse, Status> {
        self.denoiser
            .call(deadline, |ch, url| {
                let req = req.clone();
                async move {
                    record_replica(&url);
                    Ok(self
                        .denoiser_client(ch)
                        .predict(outgoing(deadline, req)?)
                        .await?
                        .into_inner())
                }
            })
            .await
    }

    async fn decode(
        &self,
        req: DecodeRequest,
        deadline: &Deadline,
    ) -> Result<DecodeResponse, Status> {
        self.autoencoder
            .call(deadline, |ch, url| {
                let req = req.clone();
                async move {
                    record_replica(&url);
                    Ok(self
                        .autoencoder_client(ch)
                        .decode(outgoing(deadline, req)?)
                        .await?
                        .into_inner())
                }
            })
            .await
    }

    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        deadline: &Deadline,
    ) -> Result<EncodeImageResponse, Status> {
        self.autoencoder
            .call(deadline, |ch, url| {
                let req = req.clone();
                async move {
                    record_replica(&url);
                    Ok(self
                        .autoencoder_client(ch)
                        .encode(outgoing(deadline, req)?)
                        .await?
                        .into_inner())
                }
            })
            .await
    }
}
