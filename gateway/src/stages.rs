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

use tonic::transport::Channel;

use crate::backends::Backends;
use crate::pool::Pool;

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

/// One idempotent call on a stage's pool: the replica recorded on the
/// current span, the deadline and trace context on the request.
async fn call<R, T, F, Fut>(pool: &Pool, deadline: &Deadline, req: R, rpc: F) -> Result<T, Status>
where
    R: Clone,
    F: Fn(Channel, tonic::Request<R>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    pool.call(deadline, |ch, url| {
        tracing::Span::current().record("replica", url.as_str());
        let req = outgoing(deadline, req.clone());
        let fut = req.map(|r| rpc(ch, r));
        async move { Ok(fut?.await?.into_inner()) }
    })
    .await
}

#[tonic::async_trait]
impl Stages for Backends {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        deadline: &Deadline,
    ) -> Result<EncodeTextResponse, Status> {
        call(&self.text, deadline, req, |ch, r| {
            let mut c = self.text_client(ch);
            async move { c.encode(r).await }
        })
        .await
    }

    async fn predict(
        &self,
        req: PredictRequest,
        deadline: &Deadline,
    ) -> Result<PredictResponse, Status> {
        call(&self.denoiser, deadline, req, |ch, r| {
            let mut c = self.denoiser_client(ch);
            async move { c.predict(r).await }
        })
        .await
    }

    async fn decode(
        &self,
        req: DecodeRequest,
        deadline: &Deadline,
    ) -> Result<DecodeResponse, Status> {
        call(&self.autoencoder, deadline, req, |ch, r| {
            let mut c = self.autoencoder_client(ch);
            async move { c.decode(r).await }
        })
        .await
    }

    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        deadline: &Deadline,
    ) -> Result<EncodeImageResponse, Status> {
        call(&self.autoencoder, deadline, req, |ch, r| {
            let mut c = self.autoencoder_client(ch);
            async move { c.encode(r).await }
        })
        .await
    }
}
