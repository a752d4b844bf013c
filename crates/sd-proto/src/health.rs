//! The one grpc.health.v1 probe of a server, for everything that watches
//! one from outside: `sdctl up` (its children), `sdctl probe`, the chaos
//! harness and the tests.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Why a probe got no status.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{url}: no answer in {seconds:.0}s")]
    Timeout { url: String, seconds: f64 },
    #[error("{url}: {message}")]
    Failed { url: String, message: String },
}

/// `addr` as a URL (`host:port` gets `http://`).
fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The status the server at `addr` reports for `service` ("": the server
/// as a whole), asked within `timeout`.
pub async fn status(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, ProbeError> {
    let url = url(addr);
    let failed = |message: String| ProbeError::Failed {
        url: url.clone(),
        message,
    };
    let check = async {
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| failed(e.to_string()))?
            .connect()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| failed(s.message().to_string()))?;
        Ok(ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown))
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| ProbeError::Timeout {
            url: url.clone(),
            seconds: timeout.as_secs_f64(),
        })?
}

/// Whether the server at `addr` answers SERVING within `timeout`.
pub async fn is_serving(addr: &str, timeout: Duration) -> bool {
    matches!(status(addr, "", timeout).await, Ok(ServingStatus::Serving))
}
