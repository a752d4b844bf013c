//! A stage's replicas: a fixed list of endpoints, or a DNS name re-resolved
//! every few seconds (a Kubernetes headless Service). Calls go to the better
//! of two random SERVING replicas (fewer calls in flight: "power of two
//! choices"); Predict, Encode and Decode are idempotent, so a call that finds
//! a replica gone is retried on another, with bounded attempts and backoff,
//! within the request's deadline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sd_runtime::deadline::Deadline;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use sd_runtime::tls::ClientTls;

/// Where a stage's replicas are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// Comma-separated URLs.
    Static(Vec<String>),
    /// `dns://host:port`: every address the name resolves to.
    Dns { host: String, port: u16 },
}

impl Endpoints {
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        if let Some(rest) = spec.strip_prefix("dns://") {
            let rest = rest.trim_start_matches('/');
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| anyhow::anyhow!("{spec}: expected dns://host:port"))?;
            return Ok(Endpoints::Dns {
                host: host.to_string(),
                port: port
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{spec}: bad port"))?,
            });
        }
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            anyhow::bail!("no endpoints in `{spec}`");
        }
        Ok(Endpoints::Static(urls))
    }
}

pub struct Replica {
    pub url: String,
    channel: Channel,
    in_flight: AtomicUsize,
    serving: AtomicBool,
}

/// A replica in use: counted in flight (for the balancer) until dropped.
pub struct Lease(Arc<Replica>);

impl Lease {
    fn new(replica: Arc<Replica>) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease(replica)
    }

    pub fn channel(&self) -> Channel {
        self.0.channel.clone()
    }

    pub fn url(&self) -> &str {
        &self.0.url
    }

    /// The replica failed under us: avoid it until its health says otherwise.
    pub fn failed(&self) {
        self.0.serving.store(false, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    pub stage: &'static str,
    endpoints: Endpoints,
    replicas: RwLock<Vec<Arc<Replica>>>,
    tls: Option<ClientTls>,
    max_attempts: usize,
}

/// Errors that mean "this replica is gone or going", not "this request is bad".
pub fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled => {
            let m = s.message().to_ascii_lowercase();
            [
                "transport error",
                "h2 protocol error",
                "connection",
                "broken pipe",
                "stream no longer needed",
                // hyper, when the connection under a call dies
                "operation was canceled",
            ]
            .iter()
            .any(|k| m.contains(k))
        }
        _ => false,
    }
}

fn rand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(n);
    (h.finish() % n as u64) as usize
}

impl Pool {
    pub fn new(
        stage: &'static str,
        spec: &str,
        tls: Option<ClientTls>,
    ) -> anyhow::Result<Arc<Self>> {
        let endpoints = Endpoints::parse(spec)?;
        let pool = Arc::new(Pool {
            stage,
            endpoints: endpoints.clone(),
            replicas: RwLock::new(Vec::new()),
            tls,
            max_attempts: 4,
        });
        if let Endpoints::Static(urls) = &endpoints {
            pool.set_urls(urls.clone())?;
        }
        Ok(pool)
    }

    fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            ep = ep.tls_config(tls.config_for(url)?)?;
        }
        Ok(ep.connect_lazy())
    }

    /// Replace the replica set, keeping the channels of replicas that stay.
    fn set_urls(&self, urls: Vec<String>) -> anyhow::Result<()> {
        let current: Vec<Arc<Replica>> =
            self.replicas.read().map(|r| r.clone()).unwrap_or_default();
        let mut next = Vec::with_capacity(urls.len());
        for url in urls {
            match current.iter().find(|r| r.url == url) {
                Some(r) => next.push(r.clone()),
                None => next.push(Arc::new(Replica {
                    channel: self.channel(&url)?,
                    url,
                    in_flight: AtomicUsize::new(0),
                    serving: AtomicBool::new(true),
                })),
            }
        }
        if let Ok(mut r) = self.replicas.write() {
            *r = next;
        }
        Ok(())
    }

    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn any_serving(&self) -> bool {
        self.replicas()
            .iter()
            .any(|r| r.serving.load(Ordering::Relaxed))
    }

    /// Re-resolve (DNS) and health-check every replica, once.
    pub async fn refresh(&self) {
        if let Endpoints::Dns { host, port } = &self.endpoints {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => {
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    let mut urls: Vec<String> = addrs.map(|a| format!("{scheme}://{a}")).collect();
                    urls.sort();
                    urls.dedup();
                    if let Err(e) = self.set_urls(urls) {
                        tracing::warn!(stage = self.stage, "resolving {host}: {e}");
                    }
                }
                Err(e) => tracing::warn!(stage = self.stage, "resolving {host}: {e}"),
            }
        }
        for r in self.replicas() {
            let mut client = HealthClient::new(r.channel.clone());
            let check = client.check(HealthCheckRequest {
                service: String::new(),
            });
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), check).await,
                Ok(Ok(ref resp)) if resp.get_ref().status == ServingStatus::Serving as i32
            );
            if r.serving.swap(ok, Ordering::Relaxed) != ok {
                tracing::info!(stage = self.stage, replica = %r.url, serving = ok, "replica health changed");
            }
        }
    }

    /// Keep the replica set and health fresh in the background.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(pool) = me.upgrade() {
                pool.refresh().await;
                drop(pool);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Power of two choices among SERVING replicas not yet tried (any
    /// replica not yet tried when none is SERVING: health may lag).
    fn pick(&self, tried: &[String]) -> Option<Arc<Replica>> {
        let all = self.replicas();
        let fresh: Vec<&Arc<Replica>> = all.iter().filter(|r| !tried.contains(&r.url)).collect();
        let serving: Vec<&Arc<Replica>> = fresh
            .iter()
            .copied()
            .filter(|r| r.serving.load(Ordering::Relaxed))
            .collect();
        let pool = if serving.is_empty() { fresh } else { serving };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let a = rand_index(n);
                let b = (a + 1 + rand_index(n - 1)) % n;
                let (ra, rb) = (pool[a], pool[b]);
                Some(
                    if rb.in_flight.load(Ordering::Relaxed) < ra.in_flight.load(Ordering::Relaxed) {
                        rb.clone()
                    } else {
                        ra.clone()
                    },
                )
            }
        }
    }

    /// Call an idempotent method, failing over between replicas.
    /// `f` gets the channel and the replica's URL (for tracing).
    pub async fn call<T, F, Fut>(&self, deadline: &Deadline, f: F) -> Result<T, Status>
    where
        F: Fn(Channel, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.with_replica(deadline, |lease| {
            let fut = f(lease.channel(), lease.url().to_string());
            async move {
                let out = fut.await;
                drop(lease);
                out
            }
        })
        .await
    }

    /// Open something long-lived on a replica (a stream), failing over like
    /// [`Pool::call`]; the lease counts the replica as busy until dropped.
    pub async fn open<T, F, Fut>(&self, deadline: &Deadline, f: F) -> Result<(T, Lease), Status>
    where
        F: Fn(Channel, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.with_replica(deadline, |lease| {
            let fut = f(lease.channel(), lease.url().to_string());
            async move { Ok((fut.await?, lease)) }
        })
        .await
    }

    async fn with_replica<T, F, Fut>(&self, deadline: &Deadline, f: F) -> Result<T, Status>
    where
        F: Fn(Lease) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<Status> = None;
        for attempt in 0..self.max_attempts {
            deadline.remaining()?;
            let replica = match self.pick(&tried) {
                Some(r) => r,
                None if !tried.is_empty() => {
                    // Every replica failed once: start over after a pause.
                    tried.clear();
                    match self.pick(&tried) {
                        Some(r) => r,
                        None => break,
                    }
                }
                None => break,
            };
            let result = f(Lease::new(replica.clone())).await;
            match result {
                Err(s) if retryable(&s) => {
                    tracing::warn!(stage = self.stage, replica = %replica.url, attempt, "{}: {}", s.code(), s.message());
                    replica.serving.store(false, Ordering::Relaxed);
                    tried.push(replica.url.clone());
                    last = Some(s);
                    let backoff = Duration::from_millis(50 << attempt.min(4));
                    if let Some(left) = deadline.remaining()? {
                        if left <= backoff {
                            return Err(Status::deadline_exceeded(
                                "the client's deadline passed while failing over",
                            ));
                        }
                    }
                    tokio::time::sleep(backoff).await;
                }
                // A model service that ran out of the time we passed on
                // answers CANCELLED ("Timeout expired"): that is our deadline.
                Err(s)
                    if s.code() == Code::Cancelled && s.message().contains("Timeout expired") =>
                {
                    return Err(Status::deadline_exceeded(format!(
                        "the client's deadline passed during a {} call",
                        self.stage
                    )));
                }
                other => return other,
            }
        }
        Err(match last {
            Some(s) => Status::unavailable(format!(
                "{}: no replica could serve the call: {}",
                self.stage,
                s.message()
            )),
            None => Status::unavailable(format!("{}: no replicas", self.stage)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_specs() {
        assert_eq!(
            Endpoints::parse("http://a:1, http://b:2").unwrap(),
            Endpoints::Static(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert_eq!(
            Endpoints::parse("dns:///denoiser.sd.svc:50053").unwrap(),
            Endpoints::Dns {
                host: "denoiser.sd.svc".into(),
                port: 50053
            }
        );
        assert!(Endpoints::parse("dns://nope").is_err());
        assert!(Endpoints::parse(" , ").is_err());
    }

    #[test]
    fn transport_failures_are_retryable_bad_requests_are_not() {
        assert!(retryable(&Status::unavailable("x")));
        assert!(retryable(&Status::unknown("transport error")));
        assert!(retryable(&Status::cancelled("operation was canceled")));
        assert!(!retryable(&Status::cancelled("Timeout expired")));
        assert!(!retryable(&Status::invalid_argument("width")));
        assert!(!retryable(&Status::deadline_exceeded("late")));
    }
}
