//! glibc malloc, tuned for a server that runs the same work over and over.
//!
//! By default glibc hands freed memory at the top of a heap back to the
//! kernel once more than a dynamic threshold is free, so a service that
//! frees all of a forward pass's activations between calls gets fresh,
//! zeroed pages — hundreds of page faults — on the next call. On the tiny
//! test model that was a third of the VAE service's decode time. Keeping
//! freed memory (the process stays at its peak, which a model server
//! reaches on every call anyway) makes steady-state calls fault-free.

/// Keep allocations up to 32 MiB on the heaps (glibc's own ceiling for its
/// dynamic threshold) and keep up to 1 GiB of freed memory instead of
/// trimming it. Larger blocks are still mapped and unmapped per use.
/// A no-op where the C library is not glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before the server starts its threads.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            eprintln!("mallopt refused the allocator settings; using glibc's defaults");
        }
    }
}
