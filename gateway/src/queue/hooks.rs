//! Webhook delivery: a job's terminal status queues a webhook in the store
//! (in the same atomic step that records the status), and the gateways
//! deliver them — at least once: a deliverer that dies leaves the entry
//! pending, and another takes it over after the lease. Each delivery is the
//! job's JSON (images left out: `GET /v1/jobs/{id}` fetches them), signed as
//! the Standard Webhooks specification says, with a `webhook-id` stable
//! across retries; retried with backoff (1 s doubling to a minute) for
//! `--webhook-retry-secs`. The URL is checked again against
//! `--webhook-allow` and the address it resolves to at every try.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Uri;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sd_runtime::metrics::Metrics;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Shared;

/// Webhooks sent at once by one gateway.
const SENDERS: usize = 8;
/// A try's time to connect, and to get an answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub async fn deliver(jobs: Shared, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(SENDERS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match jobs.store.next_hook(&jobs.worker).await {
            Ok(Some((entry, id))) => {
                tokio::spawn(send(jobs.clone(), metrics.clone(), entry, id, permit));
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!("webhooks not read: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        drop(permit);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A job's webhook message id: the same for every try (receivers drop
/// repeats by it), distinct per job.
pub fn message_id(job: &str) -> String {
    format!("msg_{}", job.trim_start_matches("job_"))
}

async fn send(
    jobs: Shared,
    metrics: Arc<Metrics>,
    entry: String,
    id: String,
    _permit: OwnedSemaphorePermit,
) {
    let job = match jobs.store.get(&id, None, false).await {
        Ok(Some(j)) => j,
        Ok(None) => {
            let _ = jobs
                .store
                .hook_done(&entry, &id, "not sent: the job expired")
                .await;
            return;
        }
        Err(_) => return, // taken again after the lease
    };
    let Some(secret) = jobs.secret.clone() else {
        let _ = jobs
            .store
            .hook_done(&entry, &id, "not sent: no secret")
            .await;
        return;
    };
    let mut body = job.to_json();
    body["type"] = serde_json::json!(format!("job.{}", job.status.as_str()));
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let msg = message_id(&id);
    let give_up = tokio::time::Instant::now() + jobs.webhook_retry;
    let mut backoff = Duration::from_secs(1);
    let mut tries = 0u32;
    // The claim is renewed all along (a try can outlast the lease).
    let beat = {
        let (jobs, entry) = (jobs.clone(), entry.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(jobs.store.config.lease / 3).await;
                let _ = jobs.store.hook_heartbeat(&jobs.worker, &entry).await;
            }
        })
    };
    let outcome = loop {
        tries += 1;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let headers = secret.headers(&msg, ts, &body);
        let r = post(&jobs.allow, &job.webhook_url, &headers, body.clone()).await;
        match r {
            Ok(code) if (200..300).contains(&code) => {
                Metrics::count(&metrics.webhooks, "delivered");
                break format!("delivered after {tries} attempt(s)");
            }
            Ok(code) => {
                Metrics::count(&metrics.webhooks, "refused");
                tracing::info!(job = %id, tries, "webhook answered {code}");
            }
            Err(e) => {
                Metrics::count(&metrics.webhooks, "unreached");
                tracing::info!(job = %id, tries, "webhook not delivered: {e}");
            }
        }
        if tokio::time::Instant::now() + backoff > give_up {
            Metrics::count(&metrics.webhooks, "given_up");
            break format!("given up after {tries} attempt(s)");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    beat.abort();
    for _ in 0..20 {
        if jobs.store.hook_done(&entry, &id, &outcome).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// POST `body` to `url` with the webhook headers: the answer's status code.
pub async fn post(
    allow: &crate::webhook::Allow,
    url: &str,
    headers: &[(&'static str, String); 3],
    body: Vec<u8>,
) -> Result<u16, String> {
    let uri = allow.check(url)?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((bare.as_str(), port)),
    )
    .await
    .map_err(|_| format!("{host} not resolved within {} s", CONNECT_TIMEOUT.as_secs()))?
    .map_err(|e| format!("{host} not resolved: {e}"))?;
    let addr = addrs
        .into_iter()
        .find(|a| allow.address_ok(&host, a.ip()))
        .ok_or_else(|| {
            format!("{host} resolves only to inside addresses (--webhook-allow-private lets private ones)")
        })?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("{addr}: connect timed out"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let req = request(&uri, &host, port, headers, body)?;
    let answer = async {
        if https {
            let tls = tls_connect(&bare, tcp).await?;
            exchange(TokioIo::new(tls), req).await
        } else {
            exchange(TokioIo::new(tcp), req).await
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| format!("{host}: no answer within {} s", ANSWER_TIMEOUT.as_secs()))?
}

fn request(
    uri: &Uri,
    host: &str,
    port: u16,
    headers: &[(&'static str, String); 3],
    body: Vec<u8>,
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let host_header = match uri.port_u16() {
        Some(_) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let mut b = hyper::Request::post(path)
        .header("host", host_header)
        .header("content-type", "application/json")
        .header("user-agent", concat!("sdserve/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request not built: {e}"))
}

async fn exchange<IO>(io: IO, req: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let code = res.status().as_u16();
    // Read (and drop) the answer's body, a bounded amount.
    let _ = tokio::time::timeout(Duration::from_secs(5), res.into_body().collect()).await;
    conn.abort();
    Ok(code)
}

async fn tls_connect(
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{host}: TLS: {e}"))
}
