//! The three model stages as the step loop needs them. The gateway's
//! implementation calls the model services through the replica pools; other
//! implementations (an in-process pipeline for benchmarks) can run the same
//! step loop without gRPC.

use sd_proto::v1::{
    DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse, EncodeImagesRequest,
    EncodeImagesResponse, EncodeTextRequest, EncodeTextResponse, ListControlNetsRequest,
    ListControlNetsResponse, ListIpAdaptersRequest, ListIpAdaptersResponse, ListLorasRequest,
    ListLorasResponse, PredictRequest, PredictResponse,
};
use sd_runtime::deadline::Deadline;
use sd_runtime::telemetry::{context_map, inject};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Status;

use crate::backends::Backends;
use crate::error::{Error, Result, Stage};
use crate::pool::{classify, Failure, Lease, Pool};

/// Text encoding, one denoising prediction, VAE decode and encode. Errors
/// are the gateway's: a model service's own answer arrives as
/// [`Error::Stage`] with its status whole.
#[tonic::async_trait]
pub trait Stages: Send + Sync + 'static {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        deadline: &Deadline,
    ) -> Result<EncodeTextResponse>;
    /// A session for one generation's denoising steps (nothing is opened
    /// before its first step).
    fn steps<'a>(&'a self, deadline: &'a Deadline) -> Box<dyn StepSession + 'a>;
    async fn decode(&self, req: DecodeRequest, deadline: &Deadline) -> Result<DecodeResponse>;
    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        deadline: &Deadline,
    ) -> Result<EncodeImageResponse>;
    /// The LoRA adapters the denoiser can load, after loading and checking
    /// `req.check` (a pipeline without LoRA support refuses any).
    async fn list_loras(
        &self,
        req: ListLorasRequest,
        _deadline: &Deadline,
    ) -> Result<ListLorasResponse> {
        if req.check.is_empty() {
            return Ok(ListLorasResponse::default());
        }
        Err(crate::error::Error::invalid(
            "loras",
            "this pipeline applies no LoRA adapters".to_string(),
        ))
    }
    /// The IP-Adapters the denoiser serves, after loading and checking
    /// `req.check` (a pipeline without them refuses any).
    async fn list_ip_adapters(
        &self,
        req: ListIpAdaptersRequest,
        _deadline: &Deadline,
    ) -> Result<ListIpAdaptersResponse> {
        if req.check.is_empty() {
            return Ok(ListIpAdaptersResponse::default());
        }
        Err(crate::error::Error::invalid(
            "ip_adapters",
            "this pipeline applies no IP-Adapters".to_string(),
        ))
    }
    /// Pictures through the text encoder's image encoder (IP-Adapters).
    async fn encode_images(
        &self,
        _req: EncodeImagesRequest,
        _deadline: &Deadline,
    ) -> Result<EncodeImagesResponse> {
        Err(crate::error::Error::invalid(
            "ip_adapters",
            "this pipeline has no image encoder".to_string(),
        ))
    }
    /// The ControlNets the denoiser serves, after loading and checking
    /// `req.check` (a pipeline without ControlNets refuses any).
    async fn list_controlnets(
        &self,
        req: ListControlNetsRequest,
        _deadline: &Deadline,
    ) -> Result<ListControlNetsResponse> {
        if req.check.is_empty() {
            return Ok(ListControlNetsResponse::default());
        }
        Err(crate::error::Error::invalid(
            "controlnets",
            "this pipeline applies no ControlNets".to_string(),
        ))
    }
}

/// One generation's denoising steps, in order.
#[tonic::async_trait]
pub trait StepSession: Send {
    /// An embedding miss ([`Error::is_embedding_miss`]) asks for the
    /// embeddings again.
    async fn step(&mut self, req: PredictRequest) -> Result<PredictResponse>;
}

/// A request for a model service: the deadline's time left, and the trace context.
fn outgoing<T>(deadline: &Deadline, msg: T) -> Result<tonic::Request<T>, Status> {
    let mut r = deadline.request(msg)?;
    inject(&mut r);
    Ok(r)
}

/// One idempotent call on a stage's pool: the replica recorded on the
/// current span, the deadline and trace context on the request.
async fn call<R, T, F, Fut>(pool: &Pool, deadline: &Deadline, req: R, rpc: F) -> Result<T>
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
    ) -> Result<EncodeTextResponse> {
        call(&self.text, deadline, req, |ch, r| {
            let mut c = self.text_client(ch);
            async move { c.encode(r).await }
        })
        .await
    }

    fn steps<'a>(&'a self, deadline: &'a Deadline) -> Box<dyn StepSession + 'a> {
        Box::new(RemoteSteps {
            backends: self,
            deadline,
            open: None,
        })
    }

    async fn list_loras(
        &self,
        req: ListLorasRequest,
        deadline: &Deadline,
    ) -> Result<ListLorasResponse> {
        call(&self.denoiser, deadline, req, |ch, r| {
            let mut c = self.denoiser_client(ch);
            async move { c.list_loras(r).await }
        })
        .await
    }

    async fn list_ip_adapters(
        &self,
        req: ListIpAdaptersRequest,
        deadline: &Deadline,
    ) -> Result<ListIpAdaptersResponse> {
        call(&self.denoiser, deadline, req, |ch, r| {
            let mut c = self.denoiser_client(ch);
            async move { c.list_ip_adapters(r).await }
        })
        .await
    }

    async fn encode_images(
        &self,
        req: EncodeImagesRequest,
        deadline: &Deadline,
    ) -> Result<EncodeImagesResponse> {
        call(&self.text, deadline, req, |ch, r| {
            let mut c = self.text_client(ch);
            async move { c.encode_images(r).await }
        })
        .await
    }

    async fn list_controlnets(
        &self,
        req: ListControlNetsRequest,
        deadline: &Deadline,
    ) -> Result<ListControlNetsResponse> {
        call(&self.denoiser, deadline, req, |ch, r| {
            let mut c = self.denoiser_client(ch);
            async move { c.list_control_nets(r).await }
        })
        .await
    }

    async fn decode(&self, req: DecodeRequest, deadline: &Deadline) -> Result<DecodeResponse> {
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
    ) -> Result<EncodeImageResponse> {
        call(&self.autoencoder, deadline, req, |ch, r| {
            let mut c = self.autoencoder_client(ch);
            async move { c.encode(r).await }
        })
        .await
    }
}

/// A generation's steps over one PredictStream on one denoiser replica.
/// If the replica fails, the step is retried on a new stream on another
/// (which may ask for the embeddings again: the caller resends them).
struct RemoteSteps<'a> {
    backends: &'a Backends,
    deadline: &'a Deadline,
    open: Option<OpenStream>,
}

struct OpenStream {
    tx: mpsc::Sender<PredictRequest>,
    rx: tonic::Streaming<PredictResponse>,
    lease: Lease,
}

impl RemoteSteps<'_> {
    async fn open(&self) -> Result<OpenStream> {
        let deadline = self.deadline;
        let ((tx, rx), lease) = self
            .backends
            .denoiser
            .open(deadline, |ch, _| {
                let (tx, requests) = mpsc::channel(1);
                let req = outgoing(deadline, ReceiverStream::new(requests));
                let mut c = self.backends.denoiser_client(ch);
                async move { Ok((tx, c.predict_stream(req?).await?.into_inner())) }
            })
            .await?;
        Ok(OpenStream { tx, rx, lease })
    }
}

impl OpenStream {
    async fn step(&mut self, req: PredictRequest) -> Result<PredictResponse, Status> {
        // A send fails when the stream is gone; its status says why.
        let sent = self.tx.send(req).await.is_ok();
        match self.rx.message().await {
            Ok(Some(r)) if sent => Ok(r),
            Ok(_) => Err(Status::unavailable("the denoiser closed the step stream")),
            Err(s) => Err(s),
        }
    }
}

#[tonic::async_trait]
impl StepSession for RemoteSteps<'_> {
    async fn step(&mut self, mut req: PredictRequest) -> Result<PredictResponse> {
        req.trace_context = context_map();
        for _ in 0..3 {
            self.deadline.remaining()?;
            let mut stream = match self.open.take() {
                Some(s) => s,
                None => self.open().await?,
            };
            tracing::Span::current().record("replica", stream.lease.url());
            // An error ends the stream; the next attempt opens another.
            let status = match stream.step(req.clone()).await {
                Ok(r) => {
                    self.open = Some(stream);
                    return Ok(r);
                }
                Err(s) => s,
            };
            match classify(&status, self.deadline) {
                Failure::ReplicaGone => {
                    tracing::warn!(replica = %stream.lease.url(), "step stream failed: {}: {}", status.code(), status.message());
                    stream.lease.failed();
                }
                Failure::DeadlinePassed => {
                    return Err(Error::DeadlinePassed {
                        when: "during a denoising step".into(),
                    })
                }
                Failure::Answered => return Err(Error::from_stage(Stage::Denoiser, status)),
            }
        }
        Err(Error::Unavailable {
            stage: Stage::Denoiser,
            reason: "the step streams kept failing".into(),
        })
    }
}
