//! One trace per generation, across processes: an in-process OTLP receiver
//! gets the gateway's request span, a span per denoising step under it, and
//! each model service's spans joined to the same trace (W3C trace context in
//! gRPC metadata). Plus Prometheus metrics on every process.

#![allow(clippy::unwrap_used)]
// One scenario against one running stack, read top to bottom; the
// 100-line limit is for non-test code.
#![allow(clippy::too_many_lines)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{Cluster, ClusterOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::GenerateRequest;

#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_is_one_trace_across_every_process() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(r))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let opts = ClusterOptions {
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
        ..Default::default()
    };
    let cluster = Cluster::start(&common::model("sd1-tiny"), opts).await;
    let mut client = GenerationClient::connect(cluster.gateway.url())
        .await
        .unwrap();
    let steps = 3;
    client
        .generate(GenerateRequest {
            prompt: "traced".into(),
            steps,
            scheduler: "euler".into(),
            seed: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();

    // Wait until the whole trace arrived.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (root, spans) = loop {
        let spans = receiver.0.lock().unwrap().clone();
        let root = spans
            .iter()
            .find(|s| s.service == "gateway" && s.name == "generate")
            .cloned();
        if let Some(root) = root {
            let in_trace: Vec<Span> = spans
                .into_iter()
                .filter(|s| s.trace_id == root.trace_id)
                .collect();
            let count = |svc: &str| in_trace.iter().filter(|s| s.service == svc).count();
            if count("denoiser") >= steps as usize
                && count("text-encoder") >= 1
                && count("autoencoder") >= 1
            {
                break (root, in_trace);
            }
        }
        assert!(
            Instant::now() < deadline,
            "trace incomplete: {:?}",
            receiver.0.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One span per denoising step, parented under the request span.
    let step_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "gateway" && s.name == "denoise_step")
        .collect();
    assert_eq!(step_spans.len(), steps as usize);
    assert!(step_spans.iter().all(|s| s.parent == root.span_id));
    // Each Predict in the denoiser is a child of a step span: the trace
    // context crossed the process boundary.
    let step_ids: Vec<&Vec<u8>> = step_spans.iter().map(|s| &s.span_id).collect();
    let predicts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "denoiser" && s.name == "Predict")
        .collect();
    assert_eq!(predicts.len(), steps as usize);
    assert!(predicts.iter().all(|p| step_ids.contains(&&p.parent)));
    let by_service: HashMap<&str, Vec<&str>> = spans.iter().fold(HashMap::new(), |mut m, s| {
        m.entry(s.service.as_str())
            .or_default()
            .push(s.name.as_str());
        m
    });
    assert!(
        by_service["text-encoder"].contains(&"Encode"),
        "{by_service:?}"
    );
    assert!(
        by_service["autoencoder"].contains(&"Decode"),
        "{by_service:?}"
    );
    assert!(
        by_service["gateway"].contains(&"text_encode") && by_service["gateway"].contains(&"decode")
    );

    // Prometheus metrics on every process.
    let per_step = r#"sd_step_duration_seconds_count{service="gateway",stage="denoise"}"#;
    assert_eq!(cluster.gateway.metric(per_step).await, steps as f64);
    let predict_ok = r#"sd_requests_total{service="denoiser",method="Predict",code="Ok"}"#;
    assert_eq!(cluster.denoisers[0].metric(predict_ok).await, steps as f64);
    // Each step waited in the batcher's queue once, and ran in a forward.
    let queued = r#"sd_step_duration_seconds_count{service="denoiser",stage="unet_queue"}"#;
    assert_eq!(cluster.denoisers[0].metric(queued).await, steps as f64);
    let forwards = r#"sd_step_duration_seconds_count{service="denoiser",stage="unet_forward"}"#;
    assert!(cluster.denoisers[0].metric(forwards).await >= 1.0);
    // The batched forwards are spans of their own (roots linked to the
    // calls they served), exported by the denoiser too.
    let batch_exported = || {
        receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.service == "denoiser" && s.name == "unet_batch")
    };
    let until = Instant::now() + Duration::from_secs(20);
    while !batch_exported() {
        assert!(Instant::now() < until, "no unet_batch span exported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cluster
            .autoencoder
            .metric(r#"sd_model_load_seconds{service="autoencoder",stage="vae"}"#)
            .await
            > 0.0
    );
    assert!(
        cluster
            .text
            .metric("sd_request_duration_seconds_bucket")
            .await
            > 0.0
    );
}
