//! The gRPC stack under test: its processes started on free ports, their
//! `/metrics` read for per-stage times, a client to the gateway.

use super::*;

/// How long a server may take to print its addresses (it does so before
/// loading its model).
pub(crate) const ADDRESS_TIMEOUT: Duration = Duration::from_secs(120);

/// A server of the stack, killed on drop, and where it serves `/metrics`.
pub(crate) struct Server {
    pub(crate) process: Process,
    pub(crate) metrics: String,
}

/// Start a server binary on free ports and read where it listens.
pub(crate) fn spawn(bin: &str, args: &[String], env: &[(&str, String)]) -> anyhow::Result<Server> {
    let mut cmd = Command::new(sd_launch::bin_dir()?.join(bin));
    cmd.args(args)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let process = Launch::new(bin)
        .timeout(ADDRESS_TIMEOUT)
        .wait_for_metrics()
        .spawn(cmd)?;
    let metrics = process
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("{bin} printed no metrics address"))?;
    Ok(Server { process, metrics })
}

/// The text exposition of a `/metrics` endpoint.
pub(crate) fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// (sum of seconds, count) per stage of `sd_step_duration_seconds`.
pub(crate) type StageTimes = BTreeMap<String, (f64, f64)>;

pub(crate) fn stage_times(exposition: &str) -> StageTimes {
    let mut out = StageTimes::new();
    for line in exposition.lines() {
        let (is_sum, rest) = if let Some(r) = line.strip_prefix("sd_step_duration_seconds_sum{") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("sd_step_duration_seconds_count{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(stage) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("stage=\""))
            .map(|s| s.trim_end_matches('"'))
        else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let e = out.entry(stage.to_string()).or_insert((0.0, 0.0));
        if is_sum {
            e.0 += v;
        } else {
            e.1 += v;
        }
    }
    out
}

/// Mean seconds per observation of each stage between two snapshots.
pub(crate) fn stage_means(before: &StageTimes, after: &StageTimes) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, (s1, n1))| {
            let (s0, n0) = before.get(k).copied().unwrap_or((0.0, 0.0));
            (n1 > &n0).then(|| (k.clone(), (s1 - s0) / (n1 - n0)))
        })
        .collect()
}

pub(crate) struct Stack {
    pub(crate) services: Vec<Server>,
    pub(crate) gateway: Server,
}

impl Stack {
    /// Stage times of the gateway and the three model services.
    pub(crate) fn stage_times(&self) -> anyhow::Result<StageTimes> {
        let mut t = stage_times(&fetch_metrics(&self.gateway.metrics)?);
        for s in &self.services {
            t.extend(stage_times(&fetch_metrics(&s.metrics)?));
        }
        Ok(t)
    }
}

pub(crate) fn start_stack(
    args: &Args,
    batching: bool,
    unet_workers: usize,
) -> anyhow::Result<Stack> {
    let mut env = vec![
        ("SD_TORCH_THREADS", args.threads.to_string()),
        ("SD_MODEL_CONCURRENCY", unet_workers.to_string()),
        ("SD_DEVICE", args.device.to_string()),
        ("SD_PRECISION", args.precision.to_string()),
        ("SD_FP8", args.fp8.to_string()),
    ];
    if !batching {
        env.push(("SD_NO_BATCHING", "true".into()));
    }
    let margs = vec![
        "--model".to_string(),
        args.model.to_string_lossy().into_owned(),
    ];
    let text = spawn("sd-text-encoder", &margs, &env)?;
    let den = spawn("sd-denoiser", &margs, &env)?;
    let vae = spawn("sd-autoencoder", &margs, &env)?;
    let gargs = vec![
        "--text-encoder".to_string(),
        text.process.url(),
        "--denoiser".into(),
        den.process.url(),
        "--autoencoder".into(),
        vae.process.url(),
        "--max-concurrent".into(),
        "16".into(),
    ];
    let gateway = spawn("sd-gateway", &gargs, &[])?;
    Ok(Stack {
        services: vec![text, den, vae],
        gateway,
    })
}

/// The guidance every pipeline is measured at (diffusers_bench.py's too),
/// whatever the model family's default.
pub(crate) const GUIDANCE: f32 = 7.5;

pub(crate) fn request(args: &Args, seed: u64, prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        steps: args.steps,
        width: args.size,
        height: args.size,
        seed: Some(seed),
        guidance_scale: Some(GUIDANCE),
        ..Default::default()
    }
}

pub(crate) fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

pub(crate) fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) async fn timed(
    client: &mut GenerationClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> anyhow::Result<f64> {
    Ok(timed_reply(client, req).await?.0)
}

/// Seconds for one Generate through the stack, and its reply.
pub(crate) async fn timed_reply(
    client: &mut GenerationClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> anyhow::Result<(f64, GenerateResponse)> {
    let t = Instant::now();
    let reply = client.generate(req).await?.into_inner();
    Ok((t.elapsed().as_secs_f64(), reply))
}

pub(crate) async fn connect(
    stack: &Stack,
) -> anyhow::Result<GenerationClient<tonic::transport::Channel>> {
    let url = stack.gateway.process.url();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(c) = GenerationClient::connect(url.clone()).await {
            let mut probe = c.clone();
            if probe
                .list_models(sd_proto::v1::ListModelsRequest {})
                .await
                .is_ok()
            {
                return Ok(c.max_decoding_message_size(256 << 20));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "stack did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
