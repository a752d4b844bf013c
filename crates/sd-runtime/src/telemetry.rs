//! Logs and traces. Logs go to stderr (text, or JSON with `--log-json`),
//! with the OpenTelemetry trace id on request spans. Traces go to an OTLP
//! collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (gRPC), named by
//! `OTEL_SERVICE_NAME`; W3C trace context travels in gRPC metadata, so every
//! hop's spans join the request's trace.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Flushes and stops trace export when dropped (keep it alive in `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// The one entry point: logging, and OTLP trace export when configured.
pub fn init_telemetry(json: bool, default_service: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Without an OTLP endpoint, a provider that exports nothing still gives
    // every request a trace id (in the logs, and passed on to other hops).
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => match build_provider(&endpoint, default_service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("telemetry: OTLP export disabled: {e}");
                Some(SdkTracerProvider::builder().build())
            }
        },
        _ => Some(SdkTracerProvider::builder().build()),
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("sdserve")));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    TelemetryGuard { provider }
}

fn build_provider(endpoint: &str, default_service: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.to_string())
        .build()?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| default_service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Put the current span's trace context into an outgoing request.
pub fn inject<T>(request: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new()
        .inject_context(&cx, &mut MetadataInjector(request.metadata_mut()));
}

/// The current span's trace context as a map (for messages on a stream).
pub fn context_map() -> std::collections::HashMap<String, String> {
    let mut map = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut map);
    map
}

/// Make `span` a child of the trace in `map` (see [`context_map`]).
pub fn adopt_map(map: &std::collections::HashMap<String, String>, span: &tracing::Span) {
    let _ = span.set_parent(TraceContextPropagator::new().extract(map));
    record_trace_id(span);
}

/// Make `span` a child of the trace the caller sent (if any), and record the
/// trace id on it so logs carry it.
pub fn adopt<T>(request: &tonic::Request<T>, span: &tracing::Span) {
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(request.metadata()));
    let _ = span.set_parent(cx);
    record_trace_id(span);
}

/// Record the span's OpenTelemetry trace id in its `trace_id` field.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    let id = span.context().span().span_context().trace_id();
    if id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(id));
    }
}
