//! sd-chaos: runs a stack under `sdctl up` (two denoiser replicas by
//! default), drives mixed load from concurrent clients and injects faults —
//! SIGKILL of a denoiser replica, SIGSTOP/SIGCONT of another, SIGTERM of the
//! gateway and of the text encoder (sdctl restarts what exits) — then
//! prints Markdown: requests by phase (sent, succeeded, failed by gRPC
//! code, cancelled or deadline-bound on purpose, p50/p99, time to recover)
//! and every process's RSS, threads and open files at the end of each
//! phase. `--soak N` instead runs N generations without faults and reports
//! how each process's usage moved from the baseline call to the last.
//! `--jobs` instead runs the stack with its job store (`sdctl up --jobs`),
//! submits async jobs throughout, SIGKILLs the gateway, Redis and a
//! denoiser replica, and reports every accepted job's fate: completed,
//! failed, or lost.

mod chaos;
mod faults;
mod jobs;
mod jobs_report;
mod load;
mod procs;
mod report;
mod soak;
mod stack;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::faults::Fault;
use crate::load::Mix;
use crate::stack::{Stack, StackArgs};

#[derive(Parser, Debug)]
#[command(about = "Chaos and soak runs against an sdserve stack started by `sdctl up`")]
struct Args {
    /// Model directory (diffusers layout); the tiny test model suits.
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Where sdctl and the sd-* binaries are (default: next to sd-chaos).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Denoiser replicas.
    #[arg(long, default_value_t = 2)]
    denoisers: usize,
    /// Requests at most (the chaos run ends sooner when its faults are done).
    #[arg(long, default_value_t = 2000)]
    max_requests: usize,
    /// Seconds the load may run at most.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
    /// Seconds of load before the first fault and after each.
    #[arg(long, default_value_t = 15)]
    phase_secs: u64,
    /// Faults, in order (default: all four).
    #[arg(long, value_delimiter = ',', value_enum)]
    faults: Vec<Fault>,
    /// How long a SIGSTOPped replica stays stopped (seconds).
    #[arg(long, default_value_t = 5)]
    stop_secs: u64,
    /// Shares of unary, stream, img2img, cancelled and short-deadline
    /// requests (percent).
    #[arg(long, value_delimiter = ',', default_value = "40,25,15,10,10")]
    mix: Vec<u64>,
    /// Percent of requests with a prompt of their own (the others repeat a
    /// few prompts, which the caches then serve).
    #[arg(long, default_value_t = 33, value_parser = clap::value_parser!(u64).range(0..=100))]
    unique_prompts: u64,
    /// Soak instead: this many generations, no faults.
    #[arg(long, conflicts_with = "jobs")]
    soak: Option<usize>,
    /// Async jobs instead: `sdctl up --jobs` (a supervised Redis, in a
    /// temporary folder), jobs submitted over gRPC throughout, faults
    /// (default: SIGKILL of the gateway, of Redis, of denoiser#0) a phase
    /// apart; then every accepted job followed until it ends.
    #[arg(long)]
    jobs: bool,
    /// `--jobs`: seconds the accepted jobs may take to end once submitting
    /// stops (those still unfinished then count as lost).
    #[arg(long, default_value_t = 120)]
    drain_secs: u64,
    /// The soak's baseline call (usage growth is measured from it).
    #[arg(long, default_value_t = 100)]
    soak_baseline: usize,
    /// Read usage every this many soak calls.
    #[arg(long, default_value_t = 100)]
    soak_every: usize,
    /// The soak's RSS growth limit for `--check`, percent.
    #[arg(long, default_value_t = 5.0)]
    max_rss_growth: f64,
    /// Exit 1 unless the run met its targets: no request lost before or
    /// around the denoiser kill and sdctl up throughout (chaos); no failed
    /// request, RSS within `--max-rss-growth`, no more threads or fds
    /// (soak); no job lost, failed or cancelled and sdctl up throughout
    /// (jobs); and sdctl exiting 0 when stopped.
    #[arg(long)]
    check: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// libtorch threads per model service.
    #[arg(long, default_value_t = 1)]
    torch_threads: u32,
    /// Write every process's log here (default: nowhere).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Extra flags for the gateway (through `sdctl up --gateway-arg`).
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    gateway_args: Vec<String>,
}

impl Args {
    fn mix(&self) -> anyhow::Result<Mix> {
        let shares: [u64; 5] = self.mix.clone().try_into().map_err(|_| {
            anyhow::anyhow!("--mix: five shares (unary, stream, img2img, cancel, deadline)")
        })?;
        anyhow::ensure!(shares.iter().sum::<u64>() > 0, "--mix: all shares are 0");
        Ok(Mix {
            kinds: shares,
            unique_prompts: self.unique_prompts,
        })
    }
}

fn header(args: &Args) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let command: Vec<String> = std::env::args().collect();
    println!("`{}`\n", command.join(" "));
    println!(
        "Model `{}`, {} denoiser replicas, {} clients, {cpus} CPUs, {} libtorch thread(s) per service.\n",
        args.model.display(),
        args.denoisers,
        args.clients,
        args.torch_threads
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mix = args.mix()?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => sd_launch::bin_dir()?,
    };
    header(&args);
    let jobs_dir = args
        .jobs
        .then(|| std::env::temp_dir().join(format!("sd-chaos-jobs-{}", std::process::id())));
    let mut gateway_args = args.gateway_args.clone();
    if args.jobs
        && !gateway_args
            .iter()
            .any(|a| a.starts_with("--job-lease-secs"))
    {
        gateway_args.push(format!("--job-lease-secs={JOB_LEASE_SECS}"));
    }
    let started = Stack::start(&StackArgs {
        bin_dir: &bin_dir,
        model: &args.model,
        denoisers: args.denoisers,
        gateway_args: &gateway_args,
        log: args.log.as_deref(),
        torch_threads: args.torch_threads,
        jobs_dir: jobs_dir.as_deref(),
    });
    let outcome = match started {
        Ok(mut stack) => {
            let met = match (args.soak, args.jobs) {
                (Some(calls), _) => soak(&args, &stack, mix, calls).await,
                (None, true) => jobs(&args, &mut stack, &gateway_args).await,
                (None, false) => chaos(&args, &mut stack, mix).await,
            };
            // Stopped whether or not the run went to its end.
            stack.stop().map(|status| (met, status))
        }
        Err(e) => Err(e),
    };
    if let Some(d) = &jobs_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    let (met, status) = outcome?;
    let met = met?;
    println!("\nsdctl stopped: {status}.");
    if args.check && !(met && status.success()) {
        anyhow::bail!("the run missed its targets (see above)");
    }
    Ok(())
}

async fn chaos(args: &Args, stack: &mut Stack, mix: Mix) -> anyhow::Result<bool> {
    let faults = if args.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.faults.clone()
    };
    let plan = chaos::Plan {
        clients: args.clients,
        mix,
        seed: args.seed,
        max_requests: args.max_requests,
        max_time: Duration::from_secs(args.max_seconds),
        quiet: Duration::from_secs(args.phase_secs),
        faults,
        stopped_for: Duration::from_secs(args.stop_secs),
    };
    let o = chaos::run(stack, &plan).await?;
    println!("### Requests by phase\n");
    println!("{}", report::phases_table(&o.phases, &o.records));
    println!("### Failures\n");
    println!("{}", report::failures_table(&o.phases, &o.records));
    println!("### Every process at the end of each phase (RSS / threads / open fds)\n");
    println!("{}", report::usage_table(&o.snapshots));
    // No request lost before the faults or around the denoiser kill.
    let guarded = |name: &str| name == "before" || name.ends_with(Fault::KillDenoiser.describe());
    let lost: usize = o
        .phases
        .iter()
        .enumerate()
        .filter(|(_, p)| guarded(&p.name))
        .map(|(i, _)| report::Tally::of(o.records.iter().filter(|r| r.phase == i)).failures())
        .sum();
    println!(
        "Lost before the faults and around the denoiser kill: {lost}; sdctl up throughout: {}.",
        o.sdctl_survived
    );
    Ok(lost == 0 && o.sdctl_survived)
}

/// The gateway's job lease for `--jobs` (unless `--gateway-arg` sets one):
/// short, so that a killed gateway's jobs are taken over within the run.
const JOB_LEASE_SECS: u64 = 3;

async fn jobs(args: &Args, stack: &mut Stack, gateway_args: &[String]) -> anyhow::Result<bool> {
    let faults = if args.faults.is_empty() {
        Fault::JOBS
            .into_iter()
            .filter(|&f| f != Fault::KillDenoiser || args.denoisers >= 2)
            .collect()
    } else {
        args.faults.clone()
    };
    let plan = jobs::Plan {
        clients: args.clients,
        unique_prompts: args.unique_prompts,
        seed: args.seed,
        quiet: Duration::from_secs(args.phase_secs),
        faults,
        stopped_for: Duration::from_secs(args.stop_secs),
        drain: Duration::from_secs(args.drain_secs),
        max_time: Duration::from_secs(args.max_seconds),
    };
    let o = jobs::run(stack, &plan).await?;
    println!("Gateway flags: `{}`.\n", gateway_args.join(" "));
    println!("### Jobs submitted by phase\n");
    println!("{}", jobs_report::phases_table(&o.phases, &o.submissions));
    println!("### Refused submissions\n");
    println!("{}", jobs_report::refusals_table(&o.phases, &o.submissions));
    println!("### Every accepted job\n");
    println!("{}", jobs_report::totals_table(&o));
    println!("### Jobs not completed\n");
    println!(
        "{}",
        jobs_report::unfinished_table(&o.phases, &o.submissions)
    );
    let t = jobs_report::Totals::of(&o.submissions);
    println!(
        "Jobs lost: {}, failed: {}, cancelled: {}; sdctl up throughout: {}.",
        t.lost,
        t.failures(),
        t.cancelled,
        o.sdctl_survived
    );
    Ok(t.lost == 0 && t.failures() == 0 && t.cancelled == 0 && o.sdctl_survived)
}

async fn soak(args: &Args, stack: &Stack, mix: Mix, calls: usize) -> anyhow::Result<bool> {
    let plan = soak::Plan {
        calls,
        baseline: args.soak_baseline,
        every: args.soak_every,
        clients: args.clients,
        mix,
        seed: args.seed,
        max_time: Duration::from_secs(args.max_seconds),
    };
    let o = soak::run(stack, &plan).await?;
    let t = report::Tally::of(&o.records);
    println!("### Soak: {calls} generations\n");
    println!(
        "{} sent: {} succeeded, {} failed, {} cancelled and {} deadline-bound on purpose; p50 {:.2} s, p99 {:.2} s.\n",
        t.sent,
        t.ok,
        t.failures(),
        t.cancelled,
        t.deadline,
        t.quantile(0.5).unwrap_or(f64::NAN),
        t.quantile(0.99).unwrap_or(f64::NAN),
    );
    let snaps: Vec<procs::Snapshot> = o.snapshots.iter().map(|(_, s)| s.clone()).collect();
    println!("{}", report::usage_table(&snaps));
    let (table, within) = soak::growth(&o, args.max_rss_growth);
    println!("{table}");
    println!(
        "Within targets (RSS growth < {}%, no thread or fd growth, no failure): {}.",
        args.max_rss_growth,
        within && t.failures() == 0
    );
    if t.failures() > 0 {
        println!("\n{}", report::failures_table(&[], &o.records));
    }
    Ok(within && t.failures() == 0)
}
