//! How many forwards a model service runs at once and how many threads
//! each gets, from the machine it runs on (docs/ARCHITECTURE.md, "Threads
//! per service"). Flags override each part.
//!
//! The rule, from what this project measured (docs/BENCHMARKS.md):
//! - **Cores** are what this process may use: the CPU affinity mask and the
//!   cgroup CPU quota (a Kubernetes CPU limit), as
//!   `std::thread::available_parallelism` reads them. libtorch's own default
//!   counts the machine's cores instead, so a pod limited to 4 CPUs on a
//!   64-core node would start 64 threads per forward and spend its quota
//!   waiting on them; we always set libtorch's thread count ourselves.
//! - **GPU**: one worker (the GPU runs one forward at a time; the
//!   denoiser's batching is what merges concurrent generations), and at
//!   most 4 CPU threads, which only prepare inputs and copy results.
//! - **CPU, text encoder and autoencoder**: one worker with every core.
//! - **CPU, denoiser**: a large UNet (SD 1.5: 860M parameters) gets one
//!   worker with every core: its operators are large enough to split (one
//!   request alone 17.5 s with 1 × 2 threads against 31.5 s with 2 × 1, and
//!   more images/min at four at once). A small UNet (the tiny fixtures, the
//!   emoji model: a few million) gets one single-threaded worker per core:
//!   its operators are too small to split, and two workers gave 2.9× the
//!   throughput of one at concurrency 8 against 1.8× for one worker with
//!   both cores. The line between is drawn at 100M parameters, between
//!   the sizes measured.
//! - **Inter-op threads**: 1. The services run eager forwards, whose
//!   operators parallelise inside themselves (intra-op); libtorch's inter-op
//!   pool serves only `at::launch` and TorchScript forks, which nothing here
//!   uses, so more would only be idle threads.

use sd_models::DeviceSpec;

/// Where the line between a small and a large UNet is drawn (parameters).
pub const LARGE_UNET_PARAMETERS: u64 = 100_000_000;

/// At most this many libtorch threads per process on a GPU.
pub const GPU_CPU_THREADS: usize = 4;

/// Which service, and for the denoiser the size of its UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    TextEncoder,
    Autoencoder,
    Denoiser { unet_parameters: u64 },
}

/// Forwards at once (workers), libtorch intra-op threads per forward, and
/// libtorch inter-op threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    pub workers: usize,
    pub intra_op: usize,
    pub inter_op: usize,
}

/// What the flags ask for; `None` leaves that part to the rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub workers: Option<usize>,
    pub intra_op: Option<usize>,
    pub inter_op: Option<usize>,
}

/// The cores this process may use (affinity and cgroup quota), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The rule of this module's doc, for `cores` usable cores on `device`.
pub fn rule(role: Role, device: DeviceSpec, cores: usize) -> Threads {
    let cores = cores.max(1);
    let (workers, intra_op) = match (device, role) {
        (DeviceSpec::Cuda(_), _) => (1, cores.min(GPU_CPU_THREADS)),
        (DeviceSpec::Cpu, Role::Denoiser { unet_parameters })
            if unet_parameters < LARGE_UNET_PARAMETERS =>
        {
            (cores, 1)
        }
        (DeviceSpec::Cpu, _) => (1, cores),
    };
    Threads {
        workers,
        intra_op,
        inter_op: 1,
    }
}

/// The rule with the flags' choices on top. Where only the workers are
/// given, the cores are split between them, so that asking for more
/// workers does not oversubscribe the machine.
pub fn choose(role: Role, device: DeviceSpec, cores: usize, o: Overrides) -> Threads {
    let auto = rule(role, device, cores);
    let workers = o.workers.unwrap_or(auto.workers).max(1);
    let intra_op = match (o.intra_op, o.workers, device) {
        (Some(n), _, _) => n,
        (None, Some(_), DeviceSpec::Cpu) => (cores.max(1) / workers).max(1),
        (None, _, _) => auto.intra_op,
    }
    .max(1);
    Threads {
        workers,
        intra_op,
        inter_op: o.inter_op.unwrap_or(auto.inter_op).max(1),
    }
}

impl std::fmt::Display for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} worker(s) × {} intra-op thread(s), {} inter-op",
            self.workers, self.intra_op, self.inter_op
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: Role = Role::Denoiser {
        unet_parameters: 859_520_964,
    };
    const TINY: Role = Role::Denoiser {
        unet_parameters: 1_000_000,
    };

    fn t(workers: usize, intra_op: usize) -> Threads {
        Threads {
            workers,
            intra_op,
            inter_op: 1,
        }
    }

    #[test]
    fn a_large_unet_on_a_cpu_gets_one_worker_with_every_core() {
        assert_eq!(rule(SD15, DeviceSpec::Cpu, 16), t(1, 16));
        assert_eq!(rule(SD15, DeviceSpec::Cpu, 2), t(1, 2));
    }

    #[test]
    fn a_small_unet_on_a_cpu_gets_a_single_threaded_worker_per_core() {
        assert_eq!(rule(TINY, DeviceSpec::Cpu, 2), t(2, 1));
        assert_eq!(rule(TINY, DeviceSpec::Cpu, 8), t(8, 1));
        let edge = Role::Denoiser {
            unet_parameters: LARGE_UNET_PARAMETERS,
        };
        assert_eq!(rule(edge, DeviceSpec::Cpu, 8), t(1, 8));
    }

    #[test]
    fn text_encoder_and_autoencoder_use_every_core_in_one_worker() {
        for role in [Role::TextEncoder, Role::Autoencoder] {
            assert_eq!(rule(role, DeviceSpec::Cpu, 6), t(1, 6));
        }
    }

    #[test]
    fn on_a_gpu_one_worker_and_few_cpu_threads() {
        for role in [Role::TextEncoder, Role::Autoencoder, SD15, TINY] {
            assert_eq!(rule(role, DeviceSpec::Cuda(0), 16), t(1, GPU_CPU_THREADS));
            assert_eq!(rule(role, DeviceSpec::Cuda(1), 2), t(1, 2));
        }
    }

    #[test]
    fn no_cores_reads_as_one() {
        assert_eq!(rule(SD15, DeviceSpec::Cpu, 0), t(1, 1));
        assert_eq!(rule(TINY, DeviceSpec::Cpu, 0), t(1, 1));
    }

    #[test]
    fn flags_override_each_part() {
        let o = Overrides {
            workers: Some(3),
            intra_op: Some(5),
            inter_op: Some(2),
        };
        let got = choose(SD15, DeviceSpec::Cpu, 16, o);
        assert_eq!(
            got,
            Threads {
                workers: 3,
                intra_op: 5,
                inter_op: 2
            }
        );
        assert_eq!(
            choose(SD15, DeviceSpec::Cpu, 16, Overrides::default()),
            rule(SD15, DeviceSpec::Cpu, 16)
        );
    }

    #[test]
    fn workers_alone_split_the_cores_between_them() {
        let o = Overrides {
            workers: Some(4),
            ..Overrides::default()
        };
        assert_eq!(choose(SD15, DeviceSpec::Cpu, 16, o), t(4, 4));
        assert_eq!(choose(SD15, DeviceSpec::Cpu, 2, o), t(4, 1));
        // Threads alone keep the rule's workers.
        let o = Overrides {
            intra_op: Some(2),
            ..Overrides::default()
        };
        assert_eq!(choose(TINY, DeviceSpec::Cpu, 8, o), t(8, 2));
        // On a GPU, workers do not divide the CPU threads.
        let o = Overrides {
            workers: Some(2),
            ..Overrides::default()
        };
        assert_eq!(choose(SD15, DeviceSpec::Cuda(0), 16, o), t(2, 4));
    }
}
