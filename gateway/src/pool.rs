//! A stage's replicas: a fixed list of endpoints, or a DNS name re-resolved
//! every few seconds (a Kubernetes headless Service). Calls go to the better
//! of two random SERVING replicas (fewer calls in flight: "power of two
//! choices"); Predict, Encode and Decode are idempotent, so a call that finds
//! a replica gone is retried on another, with backoff, for at most
//! [`FAILOVER_WINDOW`] (a restart outlasted), never past the deadline.
//!
//! Whether a failure means "this replica is gone" is decided from the
//! error's type — the transport errors in its source chain, the UNAVAILABLE
//! code a service answers while loading or draining — and a deadline from
//! the clock, never from message text (see [`classify`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sd_runtime::deadline::Deadline;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, Result, Stage};
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

impl Replica {
    /// Whether health checks (or the last call) found it serving.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
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
    pub stage: Stage,
    endpoints: Endpoints,
    replicas: RwLock<Vec<Arc<Replica>>>,
    tls: Option<ClientTls>,
    /// How long a call keeps failing over while replicas are gone.
    failover_window: Duration,
}

/// How long a call keeps trying when every replica it tried was gone: long
/// enough to outlast a supervised restart (about a second; `sdctl up`
/// restarts a process on its address), never past the caller's deadline.
pub const FAILOVER_WINDOW: Duration = Duration::from_secs(5);

/// Why a call to one replica failed, as failover sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The replica is gone or going: the connection was refused or broke
    /// (a transport error in the status's source chain), or the service
    /// said UNAVAILABLE (loading, draining). Another replica may serve.
    ReplicaGone,
    /// The client's deadline ran out during the call: the channel's own
    /// timeout fired (the time left travels with each request), or the
    /// service answered CANCELLED or DEADLINE_EXCEEDED as it ran out.
    DeadlinePassed,
    /// The replica answered; its status stands.
    Answered,
}

/// How close to the deadline a CANCELLED answer counts as the deadline's:
/// a service's timer starts when our request reaches it and fires a little
/// before the gateway's own clock says the time is up.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// Classify a failed call by its type and the clock.
pub fn classify(s: &Status, deadline: &Deadline) -> Failure {
    let chain = source_chain(s);
    if chain.iter().any(|e| e.is::<tonic::TimeoutExpired>()) {
        // The channel enforces the time left that each request carries.
        Failure::DeadlinePassed
    } else if s.code() == Code::Unavailable || chain.iter().any(|e| is_transport(*e)) {
        Failure::ReplicaGone
    } else if s.code() == Code::DeadlineExceeded
        || (s.code() == Code::Cancelled && deadline.passed_within(DEADLINE_SLACK))
    {
        Failure::DeadlinePassed
    } else {
        Failure::Answered
    }
}

/// The errors under a status: tonic keeps the transport's error (hyper's,
/// h2's, the socket's, its own timeout) as the status's source.
fn source_chain(s: &Status) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut chain = Vec::new();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        chain.push(e);
        source = e.source();
    }
    chain
}

/// Whether an error is the connection's rather than a service's answer.
fn is_transport(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<h2::Error>()
        || e.is::<hyper::Error>()
        || e.is::<std::io::Error>()
        || e.is::<tonic::transport::Error>()
        || e.is::<tonic::ConnectError>()
}

fn rand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(n);
    (h.finish() % n as u64) as usize
}

impl Pool {
    pub fn new(stage: Stage, spec: &str, tls: Option<ClientTls>) -> anyhow::Result<Arc<Self>> {
        let endpoints = Endpoints::parse(spec)?;
        let pool = Arc::new(Pool {
            stage,
            endpoints: endpoints.clone(),
            replicas: RwLock::new(Vec::new()),
            tls,
            failover_window: FAILOVER_WINDOW,
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
                        tracing::warn!(stage = %self.stage, "resolving {host}: {e}");
                    }
                }
                Err(e) => tracing::warn!(stage = %self.stage, "resolving {host}: {e}"),
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
                tracing::info!(stage = %self.stage, replica = %r.url, serving = ok, "replica health changed");
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
    pub async fn call<T, F, Fut>(&self, deadline: &Deadline, f: F) -> Result<T>
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
    pub async fn open<T, F, Fut>(&self, deadline: &Deadline, f: F) -> Result<(T, Lease)>
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

    async fn with_replica<T, F, Fut>(&self, deadline: &Deadline, f: F) -> Result<T>
    where
        F: Fn(Lease) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<Status> = None;
        let started = std::time::Instant::now();
        for attempt in 0.. {
            deadline.remaining()?;
            if attempt > 0 && started.elapsed() >= self.failover_window {
                break;
            }
            let Some(replica) = self.next_replica(&mut tried) else {
                break;
            };
            let status = match f(Lease::new(replica.clone())).await {
                Ok(v) => return Ok(v),
                Err(s) => s,
            };
            match classify(&status, deadline) {
                Failure::ReplicaGone => {
                    tracing::warn!(stage = %self.stage, replica = %replica.url, attempt, "{}: {}", status.code(), status.message());
                    replica.serving.store(false, Ordering::Relaxed);
                    tried.push(replica.url.clone());
                    last = Some(status);
                    self.back_off(attempt, deadline).await?;
                }
                Failure::DeadlinePassed => {
                    return Err(Error::DeadlinePassed {
                        when: format!("during a {} call", self.stage),
                    })
                }
                Failure::Answered => return Err(Error::from_stage(self.stage, status)),
            }
        }
        Err(Error::Unavailable {
            stage: self.stage,
            reason: match last {
                Some(s) => format!("no replica could serve the call: {}", s.message()),
                None => "no replicas".into(),
            },
        })
    }

    /// The next replica to try; when every replica failed once, start over.
    fn next_replica(&self, tried: &mut Vec<String>) -> Option<Arc<Replica>> {
        self.pick(tried).or_else(|| {
            if tried.is_empty() {
                return None;
            }
            tried.clear();
            self.pick(tried)
        })
    }

    /// Wait before the next attempt (50 ms doubling to 800 ms), unless the
    /// deadline would pass first.
    async fn back_off(&self, attempt: usize, deadline: &Deadline) -> Result<()> {
        let backoff = Duration::from_millis(50 << attempt.min(4));
        if let Some(left) = deadline.remaining()? {
            if left <= backoff {
                return Err(Error::DeadlinePassed {
                    when: "while failing over".into(),
                });
            }
        }
        tokio::time::sleep(backoff).await;
        Ok(())
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
    fn words_do_not_decide_failover() {
        let none = Deadline::none();
        // Text that used to mean "transport error" is just text now.
        for s in [
            Status::unknown("transport error"),
            Status::internal("broken pipe"),
            Status::cancelled("operation was canceled"),
            Status::cancelled("Timeout expired"),
        ] {
            assert_eq!(classify(&s, &none), Failure::Answered, "{s:?}");
        }
        assert_eq!(
            classify(&Status::unavailable("loading"), &none),
            Failure::ReplicaGone
        );
        assert_eq!(
            classify(&Status::invalid_argument("width"), &none),
            Failure::Answered
        );
        // CANCELLED at the deadline is the deadline's.
        let now = Deadline::after(Duration::from_millis(10));
        assert_eq!(
            classify(&Status::cancelled("whatever"), &now),
            Failure::DeadlinePassed
        );
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let broken = Status::from_error(Box::new(io));
        assert_eq!(classify(&broken, &none), Failure::ReplicaGone);
    }
}
