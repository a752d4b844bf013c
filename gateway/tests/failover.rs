//! Failover decided by the error's type, on real failures: a replica that is
//! gone (nothing listens), a connection reset in the middle of a step
//! stream, and a deadline that runs out inside a model service. A fake
//! denoiser (tonic, in process) stands behind a TCP relay the test can cut.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sd_gateway::backends::Backends;
use sd_gateway::error::{Error, Stage};
use sd_gateway::pool::{classify, Failure, Pool};
use sd_gateway::stages::Stages;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::denoiser_server::{Denoiser, DenoiserServer};
use sd_proto::v1::{
    DenoiserInfo, DenoiserInfoRequest, Dtype, Embedding, PredictRequest, PredictResponse,
};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// A denoiser that answers zeros: streams keep the embeddings sent on them
/// (a new stream has none); unary calls take `delay`.
#[derive(Clone, Default)]
struct FakeDenoiser {
    delay: Duration,
    streams: Arc<AtomicUsize>,
}

fn zeros(shape: &[i64]) -> sd_proto::v1::Tensor {
    let n = shape.iter().product::<i64>() as usize;
    HostTensor::new(shape.to_vec(), vec![0.0; n])
        .unwrap()
        .to_wire(Dtype::Float32)
}

fn answer(req: &PredictRequest, held: &mut HashSet<String>) -> Result<PredictResponse, Status> {
    let cond = req.cond.as_ref().unwrap();
    if cond.tensor.is_some() {
        held.insert(cond.id.clone());
    } else if !held.contains(&cond.id) {
        return Err(sd_proto::status::embedding_miss("cond", &cond.id));
    }
    Ok(PredictResponse {
        output: Some(zeros(&req.latents.as_ref().unwrap().shape)),
    })
}

type PredictStream = Pin<Box<dyn Stream<Item = Result<PredictResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Denoiser for FakeDenoiser {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        let mut held = HashSet::new();
        let mut req = request.into_inner();
        req.cond.get_or_insert_with(Default::default).tensor = Some(zeros(&[1, 2, 2]));
        answer(&req, &mut held).map(Response::new)
    }

    type PredictStreamStream = PredictStream;

    async fn predict_stream(
        &self,
        request: Request<Streaming<PredictRequest>>,
    ) -> Result<Response<PredictStream>, Status> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut held = HashSet::new();
            while let Ok(Some(req)) = inbound.message().await {
                let out = answer(&req, &mut held);
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _: Request<DenoiserInfoRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        Ok(Response::new(DenoiserInfo::default()))
    }

    async fn list_loras(
        &self,
        _: Request<sd_proto::v1::ListLorasRequest>,
    ) -> Result<Response<sd_proto::v1::ListLorasResponse>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn list_control_nets(
        &self,
        _: Request<sd_proto::v1::ListControlNetsRequest>,
    ) -> Result<Response<sd_proto::v1::ListControlNetsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }

    async fn list_ip_adapters(
        &self,
        _: Request<sd_proto::v1::ListIpAdaptersRequest>,
    ) -> Result<Response<sd_proto::v1::ListIpAdaptersResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
}

async fn serve(fake: FakeDenoiser) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DenoiserServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// A TCP relay in front of a server; `cut` resets every connection through
/// it (RST, as when a host or process dies), while new ones still pass.
struct Relay {
    addr: SocketAddr,
    cut: Arc<Notify>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Notify::new());
        let c = cut.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let cut = c.clone();
                tokio::spawn(relay(inbound, upstream, cut));
            }
        });
        Relay { addr, cut }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[allow(deprecated)] // SO_LINGER 0: close with a reset, not a FIN.
async fn relay(mut inbound: TcpStream, upstream: SocketAddr, cut: Arc<Notify>) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.notified() => {
            let _ = inbound.set_linger(Some(Duration::ZERO));
            let _ = outbound.set_linger(Some(Duration::ZERO));
        }
    }
}

/// A port nothing listens on.
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn step(id: &str, with_tensor: bool) -> PredictRequest {
    PredictRequest {
        latents: Some(zeros(&[1, 4, 2, 2])),
        timesteps: vec![999.0],
        cond: Some(Embedding {
            pooled: None,
            id: id.into(),
            tensor: with_tensor.then(|| zeros(&[1, 2, 2])),
        }),
        ..Default::default()
    }
}

fn backends(denoiser: &str) -> Backends {
    Backends {
        text: Pool::new(Stage::TextEncoder, "http://127.0.0.1:1", None).unwrap(),
        denoiser: Pool::new(Stage::Denoiser, denoiser, None).unwrap(),
        autoencoder: Pool::new(Stage::Autoencoder, "http://127.0.0.1:1", None).unwrap(),
        max_message_bytes: 4 << 20,
        token: Default::default(),
    }
}

async fn unary(pool: &Pool, deadline: &Deadline) -> Result<PredictResponse, Error> {
    pool.call(deadline, |ch, _| async move {
        let req = deadline.request(step("x", true))?;
        Ok(DenoiserClient::new(ch).predict(req).await?.into_inner())
    })
    .await
}

#[tokio::test]
async fn a_replica_that_is_gone_is_failed_over_by_type() {
    let dead = dead_url().await;
    // What tonic reports for a refused connection is a transport failure.
    let ch = tonic::transport::Endpoint::from_shared(dead.clone())
        .unwrap()
        .connect_lazy();
    let status = DenoiserClient::new(ch)
        .predict(step("x", true))
        .await
        .unwrap_err();
    assert_eq!(
        classify(&status, &Deadline::none()),
        Failure::ReplicaGone,
        "{status:?}"
    );

    // Alone, it is UNAVAILABLE after the attempts; beside a live one, the
    // call lands on the live one whichever is tried first.
    let deadline = Deadline::after(Duration::from_secs(10));
    let alone = Pool::new(Stage::Denoiser, &dead, None).unwrap();
    let e = unary(&alone, &deadline).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert_eq!(Status::from(e).code(), tonic::Code::Unavailable);

    let live = serve(FakeDenoiser::default()).await;
    let both = Pool::new(Stage::Denoiser, &format!("{dead},http://{live}"), None).unwrap();
    // The pick is random: call until the dead replica has been tried (and
    // marked), every call succeeding on the live one meanwhile.
    let dead_tried = |p: &Pool| {
        p.replicas()
            .iter()
            .any(|r| r.url == dead && !r.is_serving())
    };
    for _ in 0..64 {
        unary(&both, &deadline).await.unwrap();
        if dead_tried(&both) {
            break;
        }
    }
    assert!(dead_tried(&both), "the dead replica was never picked");
    unary(&both, &deadline).await.unwrap();
}

#[tokio::test]
async fn a_stream_reset_mid_generation_is_failed_over_to_a_new_stream() {
    let fake = FakeDenoiser::default();
    let relay = Relay::start(serve(fake.clone()).await).await;

    // The status a reset stream ends with is a transport failure by type.
    let ch = tonic::transport::Endpoint::from_shared(relay.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = DenoiserClient::new(ch)
        .predict_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(step("a", true)).await.unwrap();
    replies.message().await.unwrap().unwrap();
    relay.cut.notify_waiters();
    let _ = tx.send(step("a", false)).await;
    let status = replies.message().await.unwrap_err();
    assert_eq!(
        classify(&status, &Deadline::none()),
        Failure::ReplicaGone,
        "{status:?}"
    );

    // The gateway's step session: after the reset it opens a new stream,
    // which has not seen the embedding — the miss tells the step loop to
    // resend it, and the generation goes on.
    let backends = backends(&relay.url());
    let deadline = Deadline::after(Duration::from_secs(10));
    let mut session = backends.steps(&deadline);
    let opened = fake.streams.load(Ordering::SeqCst);
    session.step(step("b", true)).await.unwrap();
    session.step(step("b", false)).await.unwrap();
    relay.cut.notify_waiters();
    let e = session.step(step("b", false)).await.unwrap_err();
    assert!(e.is_embedding_miss(), "{e}");
    assert_eq!(
        fake.streams.load(Ordering::SeqCst),
        opened + 2,
        "a second stream"
    );
    session.step(step("b", true)).await.unwrap();
    session.step(step("b", false)).await.unwrap();
}

#[tokio::test]
async fn a_deadline_that_runs_out_in_a_model_service_is_the_deadlines() {
    let slow = serve(FakeDenoiser {
        delay: Duration::from_secs(5),
        ..Default::default()
    })
    .await;
    let url = format!("http://{slow}");
    // Each request carries the time left; the channel enforces it and says
    // so by type (tonic's TimeoutExpired under the status).
    let deadline = Deadline::after(Duration::from_millis(300));
    let ch = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_lazy();
    let status = DenoiserClient::new(ch)
        .predict(deadline.request(step("x", true)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        classify(&status, &deadline),
        Failure::DeadlinePassed,
        "{status:?}"
    );
    // A service that runs out first answers CANCELLED with no source: the
    // deadline's only if the deadline is (about) up.
    let from_service = Status::cancelled(status.message().to_string());
    assert_eq!(classify(&from_service, &deadline), Failure::DeadlinePassed);
    assert_eq!(
        classify(&from_service, &Deadline::after(Duration::from_secs(60))),
        Failure::Answered
    );

    // Through the pool: DEADLINE_EXCEEDED, no failover to the same slowness.
    let pool = Pool::new(Stage::Denoiser, &url, None).unwrap();
    let deadline = Deadline::after(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = unary(&pool, &deadline).await.unwrap_err();
    assert!(matches!(e, Error::DeadlinePassed { .. }), "{e}");
    assert_eq!(Status::from(e).code(), tonic::Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A denoiser whose every reply is a truncated protobuf message.
#[derive(Clone)]
struct Garbled;

impl tonic::server::NamedService for Garbled {
    const NAME: &'static str = "sd.v1.Denoiser";
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for Garbled {
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<HttpResponse, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        Box::pin(async move {
            Ok(tonic::server::Grpc::new(sd_proto::codec::Raw)
                .unary(Truncated, req)
                .await)
        })
    }
}

/// Field 1, length-delimited, claiming 5 bytes and carrying 1.
struct Truncated;

impl tonic::server::UnaryService<bytes::Bytes> for Truncated {
    type Response = bytes::Bytes;
    type Future = std::future::Ready<Result<Response<bytes::Bytes>, Status>>;

    fn call(&mut self, _: Request<bytes::Bytes>) -> Self::Future {
        std::future::ready(Ok(Response::new(bytes::Bytes::from_static(&[
            0x0a, 0x05, 0x01,
        ]))))
    }
}

#[tokio::test]
async fn a_reply_that_does_not_decode_is_the_services_fault_not_the_clients() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Garbled)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let pool = Pool::new(Stage::Denoiser, &format!("http://{addr}"), None).unwrap();
    let e = unary(&pool, &Deadline::after(Duration::from_secs(10)))
        .await
        .unwrap_err();
    // The client's codec could not decode the reply: INTERNAL to the
    // gateway's client, not the INVALID_ARGUMENT a bad request gets.
    assert!(matches!(e, Error::Internal(_)), "{e}");
    assert_eq!(Status::from(e).code(), tonic::Code::Internal);
}
