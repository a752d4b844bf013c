//! The HTTP front door beside gRPC: the OpenAI Images API (`/v1`), an
//! AUTOMATIC1111 subset (`/sdapi/v1`), and a web page (`/`). Every generation runs through the
//! same [`GenerationService`] as gRPC — its API keys, validation,
//! admission, deadline, tracing and metrics — so the two doors differ only
//! in their wire formats. Request bodies are bounded in bytes and in time
//! (a slow client is cut off), and so are request headers.

pub mod a1111;
pub mod async_jobs;
pub mod error;
pub mod fields;
pub mod jobs;
pub mod openai;
pub mod store;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use sd_proto::v1::GenerateResponse;
use sd_runtime::deadline::Deadline;

use crate::service::{GenerationService, HttpCall};
use error::{HttpError, HttpResult};

#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// Also serve HTTP here: the OpenAI Images API (/v1) and an
    /// AUTOMATIC1111 API subset (/sdapi/v1). Unset: gRPC only.
    #[arg(long, env = "SD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Largest HTTP request body in bytes (JSON with base64 images,
    /// multipart uploads); beyond: 413.
    #[arg(long, env = "SD_HTTP_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub http_max_body_bytes: usize,
    /// Seconds a client may take to send its request headers, and again
    /// its body; beyond: the connection is closed (headers) or 408 (body).
    #[arg(long, env = "SD_HTTP_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub http_read_timeout_secs: u64,
    /// Deadline of a generation asked for over HTTP, in seconds; beyond: 504.
    #[arg(long, env = "SD_HTTP_GENERATION_TIMEOUT_SECS", default_value_t = 600)]
    pub http_generation_timeout_secs: u64,
    /// Memory for images returned as URLs (OpenAI `response_format: url`),
    /// MiB; each URL answers for an hour or until newer images push it out.
    #[arg(long, env = "SD_HTTP_URL_STORE_MIB", default_value_t = 256)]
    pub http_url_store_mib: usize,
}

/// The line the gateway prints on stdout with its HTTP address, before
/// gRPC's `listening on ADDR` (sdctl and the tests read it).
pub const HTTP_LINE: &str = "http on ";

/// What every route shares.
pub struct Http {
    pub service: Arc<GenerationService>,
    pub store: store::ImageStore,
    pub jobs: Arc<jobs::Jobs>,
    pub max_body: usize,
    pub read_timeout: Duration,
    pub generation_timeout: Duration,
}

pub type State = Arc<Http>;

impl Http {
    pub fn new(service: Arc<GenerationService>, args: &HttpArgs) -> Self {
        Http {
            service,
            store: store::ImageStore::new(args.http_url_store_mib << 20),
            jobs: Arc::new(jobs::Jobs::default()),
            max_body: args.http_max_body_bytes,
            read_timeout: Duration::from_secs(args.http_read_timeout_secs.max(1)),
            generation_timeout: Duration::from_secs(args.http_generation_timeout_secs.max(1)),
        }
    }

    /// A generation for `headers`' caller, through the gRPC service's path.
    pub async fn generate(
        &self,
        method: &'static str,
        headers: &HeaderMap,
        req: sd_proto::v1::GenerateRequest,
        events: Option<tokio::sync::mpsc::Sender<crate::pipeline::Event>>,
        stop: Option<crate::pipeline::Stop>,
    ) -> HttpResult<GenerateResponse> {
        let call = HttpCall {
            authorization: authorization(headers),
            deadline: Deadline::after(self.generation_timeout),
            events,
            stop,
        };
        Ok(self.service.generate_http(method, req, call).await?)
    }

    /// Who is calling, for A1111's per-caller jobs (progress, interrupt).
    pub fn caller(&self, headers: &HeaderMap) -> jobs::Caller {
        jobs::Caller(self.service.keys.caller(authorization(headers).as_deref()))
    }

    /// Refuse a caller without a valid key ([`router`]'s layer asks).
    pub fn check_key(&self, headers: &HeaderMap) -> HttpResult<()> {
        self.service
            .keys
            .check_authorization(authorization(headers).as_deref())
            .map_err(HttpError::from)
    }

    /// The request body, at most `max_body` bytes, within the read timeout.
    pub async fn body(&self, body: Body) -> HttpResult<Bytes> {
        let read = axum::body::to_bytes(body, self.max_body);
        match tokio::time::timeout(self.read_timeout, read).await {
            Err(_) => Err(HttpError {
                status: StatusCode::REQUEST_TIMEOUT,
                param: None,
                message: format!(
                    "the request body took longer than {} s to arrive",
                    self.read_timeout.as_secs()
                ),
            }),
            Ok(Err(e)) => Err(body_error(&e, self.max_body)),
            Ok(Ok(b)) => Ok(b),
        }
    }

    /// The body as a JSON object.
    pub async fn json_object(
        &self,
        body: Body,
    ) -> HttpResult<serde_json::Map<String, serde_json::Value>> {
        json_object_from(&self.body(body).await?)
    }
}

/// Bytes as a JSON object, or 400 naming the body.
pub fn json_object_from(bytes: &[u8]) -> HttpResult<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(HttpError::invalid("body", "expected a JSON object")),
        Err(e) => Err(HttpError::invalid(
            "body",
            format_args!("not valid JSON: {e}"),
        )),
    }
}

/// 413 for a body over the limit, 400 for one that broke off.
fn body_error(e: &axum::Error, max: usize) -> HttpError {
    let too_large = std::error::Error::source(e)
        .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        || e.to_string().contains("length limit");
    if too_large {
        HttpError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            param: Some("body".into()),
            message: format!("body: larger than {max} bytes (--http-max-body-bytes)"),
        }
    } else {
        HttpError::invalid("body", format_args!("could not be read: {e}"))
    }
}

/// The `authorization` header's value.
pub fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Base64 (optionally a `data:...;base64,` URL, as browsers and A1111
/// clients send) to bytes; a bad one is 400 naming `field`.
pub fn decode_base64(field: &str, s: &str) -> HttpResult<Vec<u8>> {
    let payload = match s.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => s,
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| HttpError::invalid(field, format_args!("not valid base64: {e}")))
}

pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Every route: the API's behind one check of the API keys (a route added
/// there cannot forget it), the page, image URLs and health open.
pub fn router(state: State) -> Router {
    let api = Router::new()
        .merge(openai::routes())
        .merge(async_jobs::routes())
        .merge(a1111::routes())
        .merge(a1111::controlnet::routes())
        .merge(ui::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .merge(api)
        .merge(openai::open_routes())
        .merge(ui::open_routes())
        .route("/health", get(|| async { "ok" }))
        .fallback(not_found)
        .with_state(state)
}

/// 401 for a caller without a valid key (when keys are set), before any
/// handler runs.
async fn require_key(
    axum::extract::State(http): axum::extract::State<State>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match http.check_key(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    HttpError::not_found(format!("no route {}", uri.path())).into_response()
}

/// The HTTP listener, bound before the model is reached: until [`Door::open`]
/// every request is 503 ("loading"), as gRPC answers UNAVAILABLE.
pub struct Door {
    slot: Arc<std::sync::OnceLock<Router>>,
    local: SocketAddr,
}

impl Door {
    /// Bind `addr` and serve on it (in the background); request headers
    /// must arrive within `header_timeout`.
    pub async fn bind(addr: SocketAddr, header_timeout: Duration) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--http-listen {addr}: {e}"))?;
        let local = listener.local_addr()?;
        let slot = Arc::new(std::sync::OnceLock::new());
        tokio::spawn(serve(listener, slot.clone(), header_timeout));
        Ok(Door { slot, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serve every route from now on.
    pub fn open(&self, state: State) {
        let _ = self.slot.set(router(state));
        tracing::info!(local = %self.local, "HTTP serving (OpenAI /v1, AUTOMATIC1111 /sdapi/v1)");
    }
}

/// Until the door opens: 503, retry shortly.
fn loading() -> Response {
    HttpError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        param: None,
        message: "loading: the model services are not ready yet".into(),
    }
    .into_response()
}

async fn serve(
    listener: tokio::net::TcpListener,
    slot: Arc<std::sync::OnceLock<Router>>,
    header_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = slot.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let router = slot.get().cloned();
                async move {
                    let response = match router {
                        Some(r) => {
                            use tower::ServiceExt;
                            r.oneshot(req.map(Body::new))
                                .await
                                .unwrap_or_else(|e| match e {})
                        }
                        None => loading(),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "http connection: {e}");
            }
        });
    }
}

/// `WxH` (OpenAI's `size`) as (width, height).
pub fn parse_size(field: &str, s: &str) -> HttpResult<(u32, u32)> {
    let bad = || {
        HttpError::invalid(
            field,
            format_args!("`{s}`: expected WIDTHxHEIGHT, e.g. 512x512"),
        )
    };
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// Routes answer JSON.
pub fn json(v: serde_json::Value) -> Response {
    axum::Json(v).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("size", "512x768").unwrap(), (512, 768));
        assert_eq!(parse_size("size", "64X64").unwrap(), (64, 64));
        for bad in ["512", "x512", "0x512", "ax b", "-8x8"] {
            let e = parse_size("size", bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("size"), "{bad}");
        }
    }

    /// What the fuzz target (fuzz/fuzz_targets/http_request.rs) checks, on
    /// a deterministic corpus: valid bodies cut and flipped at every
    /// position, and bytes from a fixed-seed generator. Every outcome is a
    /// request or a 4xx naming what is wrong; nothing panics.
    #[test]
    fn any_bytes_make_a_request_or_a_clean_refusal() {
        let valid: [&[u8]; 3] = [
            br#"{"prompt": "a (red) cube", "n": 2, "size": "64x64", "seed": 7, "steps": 4}"#,
            br#"{"prompt": "x", "sampler_name": "DPM++ 2M Karras", "batch_size": 2, "n_iter": 3, "seed": -1}"#,
            br#"{"prompt": "x", "init_images": ["data:image/png;base64,aGk="], "denoising_strength": 0.5}"#,
        ];
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for v in valid {
            for i in 0..v.len() {
                inputs.push(v[..i].to_vec());
                let mut flipped = v.to_vec();
                flipped[i] ^= 0x5a;
                inputs.push(flipped);
            }
        }
        let alphabet: &[u8] = b"{}[]\":,0123456789.-eE truefalsnl\\\"prompt";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..200 {
            let bytes = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            inputs.push(bytes);
        }
        for input in &inputs {
            check_refusal(openai::parse(input).err());
            check_refusal(a1111::parse(input, false).err());
            check_refusal(a1111::parse(input, true).err());
        }
    }

    fn check_refusal(e: Option<HttpError>) {
        if let Some(e) = e {
            assert!(e.status.is_client_error(), "{e:?}");
            assert!(!e.message.is_empty() && e.message.len() < 1024, "{e:?}");
        }
    }

    #[test]
    fn base64_plain_and_data_urls() {
        assert_eq!(decode_base64("image", "aGk=").unwrap(), b"hi");
        assert_eq!(
            decode_base64("image", "data:image/png;base64,aGk=").unwrap(),
            b"hi"
        );
        assert_eq!(decode_base64("image", "aGk").unwrap(), b"hi");
        assert_eq!(decode_base64("image", "aG\nk=").unwrap(), b"hi");
        let e = decode_base64("init_images", "@@@").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("init_images"));
    }
}
