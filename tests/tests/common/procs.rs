//! Real sdserve processes for serving tests: each binary started on a free
//! port (`--listen 127.0.0.1:0`, the port read from its stdout), stopped on
//! drop.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sd_launch::{Launch, Process};

use super::stack::bin_dir;

/// One server process, killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub addr: String,
    process: Process,
}

impl Proc {
    /// Start `bin` with `args` (and `--listen 127.0.0.1:0` unless given).
    pub fn spawn(bin: &str, args: &[String], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(bin_dir().join(bin));
        cmd.args(args);
        if !args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.env("SD_TORCH_THREADS", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stderr(if std::env::var_os("SD_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        let process = Launch::new(bin)
            .timeout(Duration::from_secs(30))
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("{:#}", anyhow::Error::new(e)));
        Proc {
            name: bin.to_string(),
            addr: process.addr().to_string(),
            process,
        }
    }

    pub fn url(&self) -> String {
        self.process.url()
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The gateway's HTTP base URL (started with `--http-listen`).
    pub fn http(&self) -> String {
        format!(
            "http://{}",
            self.process
                .http_addr()
                .expect("started with --http-listen")
        )
    }

    pub fn port(&self) -> u16 {
        self.process.port().expect("port")
    }

    /// The status grpc.health.v1 reports for `service` ("" = overall), or None if unreachable.
    pub async fn health(&self, service: &str) -> Option<i32> {
        sd_proto::health::status(&self.url(), service, Duration::from_secs(5))
            .await
            .ok()
            .map(|s| s as i32)
    }

    pub async fn wait_serving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.health("").await != Some(1) {
            assert!(
                Instant::now() < deadline,
                "{} not SERVING in {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory now (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the process is alive");
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Send `sig`; a process already gone is not an error here.
    pub fn signal(&self, sig: i32) {
        let _ = self.process.signal(sig);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout).ok().flatten()
    }

    /// Scrape `/metrics` and return the value of the first sample whose line
    /// starts with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metric_where(prefix, "").await
    }

    /// The same, summed over the samples whose line also contains `label`
    /// (e.g. `outcome="started"`).
    pub async fn metric_where(&self, prefix: &str, label: &str) -> f64 {
        let addr = self
            .process
            .metrics_addr()
            .expect("started with --metrics-listen");
        let body = http_get(&addr, "/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A stack of separate processes (so tests can kill and restart any of them).
pub struct Cluster {
    pub text: Proc,
    pub denoisers: Vec<Proc>,
    pub autoencoder: Proc,
    pub gateway: Proc,
}

pub struct ClusterOptions<'a> {
    pub denoisers: usize,
    pub gateway_args: &'a [&'a str],
    pub service_args: &'a [&'a str],
    pub env: Vec<(&'a str, String)>,
}

impl Default for ClusterOptions<'_> {
    fn default() -> Self {
        ClusterOptions {
            denoisers: 1,
            gateway_args: &[],
            service_args: &[],
            env: vec![],
        }
    }
}

impl Cluster {
    pub async fn start(model: &Path, o: ClusterOptions<'_>) -> Cluster {
        let model_args = |extra: &[&str]| -> Vec<String> {
            let mut v = vec![
                "--model".to_string(),
                model.to_string_lossy().into_owned(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
            ];
            v.extend(o.service_args.iter().map(|s| s.to_string()));
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let with_name = |name: &str| {
            let mut e = o.env.clone();
            e.push(("OTEL_SERVICE_NAME", name.to_string()));
            e
        };
        let text = Proc::spawn(
            "sd-text-encoder",
            &model_args(&[]),
            &with_name("text-encoder"),
        );
        let denoisers: Vec<Proc> = (0..o.denoisers)
            .map(|_| Proc::spawn("sd-denoiser", &model_args(&[]), &with_name("denoiser")))
            .collect();
        let autoencoder = Proc::spawn(
            "sd-autoencoder",
            &model_args(&[]),
            &with_name("autoencoder"),
        );
        let scheme = if o
            .gateway_args
            .iter()
            .any(|a| a.starts_with("--backend-tls-ca"))
        {
            "https"
        } else {
            "http"
        };
        let url = |p: &Proc| format!("{scheme}://{}", p.addr);
        let mut gargs = vec![
            "--text-encoder".to_string(),
            url(&text),
            "--denoiser".into(),
            denoisers.iter().map(url).collect::<Vec<_>>().join(","),
            "--autoencoder".into(),
            url(&autoencoder),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--backend-refresh-ms".into(),
            "200".into(),
        ];
        gargs.extend(o.gateway_args.iter().map(|s| s.to_string()));
        let gateway = Proc::spawn("sd-gateway", &gargs, &with_name("gateway"));
        let c = Cluster {
            text,
            denoisers,
            autoencoder,
            gateway,
        };
        if scheme == "http" && !o.gateway_args.iter().any(|a| a.starts_with("--tls")) {
            c.gateway.wait_serving(Duration::from_secs(60)).await;
        }
        c
    }
}
