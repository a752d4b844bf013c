//! What each process of a stack is started with: the model services'
//! flags per stage and replica, and the gateway's routes to them.

use super::*;

/// The flags every model service of `model` gets.
pub(super) fn service_args(args: &UpArgs, model: &Path) -> Vec<String> {
    let model = model.to_string_lossy().into_owned();
    let drain = args.drain_secs.to_string();
    [
        "--model",
        &model,
        "--device",
        &args.device,
        "--precision",
        &args.precision,
        "--drain-secs",
        &drain,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        config_for(args, Path::new(&model))
            .into_iter()
            .flat_map(|c| ["--config".to_string(), c.to_string_lossy().into_owned()]),
    )
    .collect()
}

/// The flags one stage's services get: every service's, and the
/// autoencoder's `--vae`.
#[cfg(test)]
pub(super) fn stage_args(args: &UpArgs, stage: Stage) -> Vec<String> {
    let first = args.model.first().cloned().unwrap_or_default();
    stage_args_for(args, stage, &first)
}

/// The same, for the services of `model`.
pub(super) fn stage_args_for(args: &UpArgs, stage: Stage, model: &Path) -> Vec<String> {
    let mut v = service_args(args, model);
    if let (Stage::Autoencoder, Some(vae)) = (stage, &args.vae) {
        v.extend(["--vae".to_string(), vae.to_string_lossy().into_owned()]);
    }
    if let (Stage::Denoiser, Some(file)) = (stage, &args.transformer) {
        v.extend([
            "--transformer".to_string(),
            file.to_string_lossy().into_owned(),
        ]);
    }
    if let (Stage::Denoiser, Some(fp8)) = (stage, &args.fp8) {
        v.extend(["--fp8".to_string(), fp8.clone()]);
    }
    if let (Stage::TextEncoder | Stage::Denoiser, Some(dir)) = (stage, &args.lora_dir) {
        v.extend(["--lora-dir".to_string(), dir.to_string_lossy().into_owned()]);
    }
    if let (Stage::Denoiser, Some(dir)) = (stage, &args.controlnet_dir) {
        v.extend([
            "--controlnet-dir".to_string(),
            dir.to_string_lossy().into_owned(),
        ]);
    }
    if let (Stage::TextEncoder | Stage::Denoiser, Some(dir)) = (stage, &args.ip_adapter_dir) {
        v.extend([
            "--ip-adapter-dir".to_string(),
            dir.to_string_lossy().into_owned(),
        ]);
    }
    if let (Stage::TextEncoder, Some(dir)) = (stage, &args.embeddings_dir) {
        v.extend([
            "--embeddings-dir".to_string(),
            dir.to_string_lossy().into_owned(),
        ]);
    }
    v
}

/// Every replica of every stage, in stage order, each on a free port.
pub(super) fn service_specs(
    args: &UpArgs,
    dir: &Path,
    replicas: Replicas,
    token: &'static StackToken,
) -> anyhow::Result<Vec<Spec>> {
    let preload = crate::alloc::preload(args.allocator, std::env::var_os("LD_PRELOAD"))?;
    match &preload {
        Some(p) => eprintln!(
            "model services' allocator: LD_PRELOAD={}",
            p.to_string_lossy()
        ),
        None => eprintln!("model services' allocator: glibc malloc"),
    }
    let env: Vec<_> = preload
        .into_iter()
        .map(|p| (std::ffi::OsString::from("LD_PRELOAD"), p))
        .collect();
    let mut specs = Vec::new();
    for (m, model) in args.model.iter().enumerate() {
        for stage in Stage::ALL {
            for replica in 0..replicas.of(stage) {
                specs.push(Spec {
                    name: service_name(stage, m, model),
                    replica,
                    bin: dir.join(stage.binary()),
                    args: stage_args_for(args, stage, model),
                    listen: "127.0.0.1:0".to_string(),
                    http_listen: None,
                    drain: Duration::from_secs(args.drain_secs),
                    token,
                    env: env.clone(),
                    kind: Kind::Grpc,
                });
            }
        }
    }
    Ok(specs)
}

/// The process name of `stage` for the `m`-th model: the stage's own for
/// the first (default) model, `stage@name` for the others.
pub(super) fn service_name(stage: Stage, m: usize, model: &Path) -> &'static str {
    if m == 0 {
        stage.name()
    } else {
        // A few per run, for as long as sdctl runs.
        Box::leak(format!("{}@{}", stage.name(), model_name(model)).into_boxed_str())
    }
}

/// The gateway in front of `services`: each stage's URLs, sdctl's drain
/// time unless the extra flags set their own, then the extra flags.
pub(super) fn gateway_spec(
    args: &UpArgs,
    dir: &Path,
    services: &[Child],
    token: &'static StackToken,
) -> anyhow::Result<Spec> {
    let mut v = Vec::new();
    let urls = |name: &str, sep: &str| -> String {
        services
            .iter()
            .filter(|c| c.spec.name == name)
            .map(Child::url)
            .collect::<Vec<_>>()
            .join(sep)
    };
    for stage in Stage::ALL {
        v.push(gateway_flag(stage));
        v.push(urls(stage.name(), ","));
    }
    // The other models: a route each, to their own services.
    for (m, model) in args.model.iter().enumerate().skip(1) {
        let stages: Vec<String> = Stage::ALL
            .iter()
            .map(|&s| urls(service_name(s, m, model), "|"))
            .collect();
        v.push("--model-route".into());
        v.push(format!("{}={}", model_name(model), stages.join(",")));
    }
    if let Some(url) = redis_url(args, services) {
        v.extend(["--redis".to_string(), url]);
    }
    let drain = match drain_flag(&args.gateway_args)? {
        Some(secs) => secs,
        None => {
            v.extend(["--drain-secs".to_string(), args.drain_secs.to_string()]);
            args.drain_secs
        }
    };
    v.extend(args.gateway_args.iter().cloned());
    Ok(Spec {
        name: GATEWAY,
        replica: 0,
        bin: dir.join("sd-gateway"),
        args: v,
        listen: format!("{}:{}", args.host, args.port),
        http_listen: (!args.no_http).then(|| format!("{}:{}", args.host, args.http_port)),
        drain: Duration::from_secs(drain),
        token,
        env: Vec::new(),
        kind: Kind::Grpc,
    })
}

/// The job store for `--jobs`: a local `redis-server` on a free port
/// (or `--redis-port`), its data in `--jobs-dir` with the append-only file
/// synced at every write (`appendfsync always`), so a job the gateway
/// acknowledged survives a SIGKILL of Redis. Its log goes to
/// `redis.log` there.
pub(super) fn redis_spec(args: &UpArgs, token: &'static StackToken) -> anyhow::Result<Spec> {
    let bin = which("redis-server").ok_or_else(|| {
        anyhow::anyhow!(
            "--jobs: redis-server not found on PATH (`make setup` installs it); or point the \
             gateway at a Redis with --redis URL"
        )
    })?;
    std::fs::create_dir_all(&args.jobs_dir)
        .map_err(|e| anyhow::anyhow!("--jobs-dir {}: {e}", args.jobs_dir.display()))?;
    let dir = args.jobs_dir.canonicalize()?;
    let port = match args.redis_port {
        0 => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
        p => p,
    };
    let dir_s = dir.to_string_lossy().into_owned();
    let log = dir.join("redis.log").to_string_lossy().into_owned();
    let flags = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "yes",
        "--dir",
        &dir_s,
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--logfile",
        &log,
        "--daemonize",
        "no",
    ];
    Ok(Spec {
        name: REDIS,
        replica: 0,
        bin,
        args: flags.iter().map(|s| s.to_string()).collect(),
        listen: format!("127.0.0.1:{port}"),
        http_listen: None,
        drain: Duration::from_secs(5),
        token,
        env: Vec::new(),
        kind: Kind::Redis,
    })
}

/// `name`'s path on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The job store the gateway uses: `--redis`, or the local one `--jobs`
/// started.
fn redis_url(args: &UpArgs, services: &[Child]) -> Option<String> {
    if let Some(url) = &args.redis {
        return Some(url.clone());
    }
    services
        .iter()
        .find(|c| c.spec.kind == Kind::Redis)
        .map(|c| format!("redis://{}/0", c.addr()))
}

/// The `--drain-secs` among the gateway's extra flags, if any.
pub(super) fn drain_flag(extra: &[String]) -> anyhow::Result<Option<u64>> {
    let mut found = None;
    for (i, a) in extra.iter().enumerate() {
        let value = match a.strip_prefix("--drain-secs") {
            Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
            Some("") => extra.get(i + 1).map(String::as_str),
            _ => continue,
        };
        let secs = value
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("--gateway-arg --drain-secs: expected seconds"))?;
        found = Some(secs);
    }
    Ok(found)
}
