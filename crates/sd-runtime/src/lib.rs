//! Shared server plumbing for the sdserve binaries (gateway and model
//! services alike): logging, the listening socket, grpc.health.v1 that tells
//! the truth, server reflection, and shutdown on SIGTERM/SIGINT.

pub mod admission;
pub mod alloc;
pub mod deadline;
pub mod error;
pub mod internal;
pub mod lifecycle;
pub mod lru;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod tls;

pub use error::Refusal;
pub use telemetry::{init_telemetry, TelemetryGuard};

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Flags every server takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout as
    /// `listening on ADDR`).
    #[arg(long, env = "SD_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "SD_LOG_JSON")]
    pub log_json: bool,
    /// Largest gRPC message accepted or sent, in MiB (the default fits the
    /// largest request the limits allow).
    #[arg(long, env = "SD_MAX_MESSAGE_MIB", default_value_t = 64)]
    pub max_message_mib: usize,
    /// Serve Prometheus metrics on this address (`/metrics`); off when unset.
    #[arg(long, env = "SD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM, how long work in flight may take to finish (seconds).
    #[arg(long, env = "SD_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// Threads for gRPC I/O. 1 (the default) runs every connection on one
    /// thread, which saves the cross-thread wake-ups each call would pay on
    /// a multi-threaded runtime; model work and large image work run on
    /// their own threads either way. More helps a gateway terminating TLS
    /// for many clients.
    #[arg(long, env = "SD_IO_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub io_threads: u16,
}

impl ServerArgs {
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_mib.saturating_mul(1 << 20)
    }

    /// The async runtime the server runs on (see `--io-threads`). Called
    /// first thing in `main`, it also tunes the allocator for a server
    /// ([`alloc::retain_freed_memory`]) while the process has one thread.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        alloc::retain_freed_memory();
        let mut builder = if self.io_threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(self.io_threads as usize);
            b
        };
        builder.enable_all().build()
    }
}

/// Bind the listening socket (TCP_NODELAY on accepted connections) and announce it on stdout (launchers and tests
/// read this line to learn the port).
pub async fn listen(addr: SocketAddr) -> anyhow::Result<(TcpIncoming, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    tracing::info!(%local, "listening");
    // No Nagle: a step's small responses must not wait for delayed ACKs.
    Ok((TcpIncoming::from(listener).with_nodelay(Some(true)), local))
}

/// A health service that starts NOT_SERVING for the overall status ("") and
/// for `service`, until [`Health::serving`] is called.
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    pub async fn new(
        service: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    ) {
        let reporter = HealthReporter::new();
        let server = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        let h = Health { reporter, service };
        h.set(ServingStatus::NotServing).await;
        (h, server)
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }

    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }
}

/// The services a server hosts beside its own.
const HOSTED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn reflection_builder(served: &str) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .with_service_name(served);
    for s in HOSTED {
        b = b.with_service_name(s);
    }
    b
}

/// Server reflection for a server whose own service is `served`
/// (`sd.v1.Denoiser`, …): that service, health and reflection itself are
/// listed, every `sd.v1` type is described. Both versions clients speak:
/// `grpc.reflection.v1` (grpcurl) and `grpc.reflection.v1alpha` (grpcio's
/// reflection client and older tools).
#[allow(clippy::type_complexity)]
pub fn reflection(
    served: &str,
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    Ok((
        reflection_builder(served).build_v1()?,
        reflection_builder(served).build_v1alpha()?,
    ))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
