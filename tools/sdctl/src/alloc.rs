//! The memory allocator `sdctl up` starts the model services with.
//!
//! libtorch allocates and frees every activation of every operator through
//! malloc. With gperftools' tcmalloc preloaded, a UNet forward on this
//! project's CPU machine took 19% less time in fp32 (SD 1.5 at 256², 2
//! rows: 2.79 → 2.27 s), 9% less in bf16 (1.24 → 1.12 s) and 17% less on
//! the tiny model (7.0 → 5.8 ms); jemalloc took 25% more
//! (docs/BENCHMARKS.md). So model services get tcmalloc where it is
//! installed (Debian: libtcmalloc-minimal4, which `make setup` installs);
//! the gateway keeps glibc's, whose settings `sd_runtime::alloc` tunes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `--allocator`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocator {
    /// tcmalloc where installed, else glibc's malloc.
    Auto,
    /// tcmalloc; an error where it is not installed.
    Tcmalloc,
    /// glibc's malloc.
    Glibc,
}

/// Where distributions put tcmalloc's minimal library.
const TCMALLOC: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
];

/// The first of `candidates` that exists.
fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The `LD_PRELOAD` the model services get for `choice` (None: leave the
/// environment as it is), `existing` being the current `LD_PRELOAD`.
pub fn preload(choice: Allocator, existing: Option<OsString>) -> anyhow::Result<Option<OsString>> {
    preload_from(choice, find(&TCMALLOC), existing)
}

fn preload_from(
    choice: Allocator,
    tcmalloc: Option<PathBuf>,
    existing: Option<OsString>,
) -> anyhow::Result<Option<OsString>> {
    let lib = match (choice, tcmalloc) {
        (Allocator::Glibc, _) | (Allocator::Auto, None) => return Ok(None),
        (Allocator::Tcmalloc, None) => anyhow::bail!(
            "--allocator tcmalloc: libtcmalloc_minimal.so.4 is not installed (looked in {}); \
             install libtcmalloc-minimal4, or use --allocator glibc",
            TCMALLOC.join(", ")
        ),
        (_, Some(lib)) => lib,
    };
    Ok(Some(join(existing, &lib)))
}

/// `lib` after what `LD_PRELOAD` already names (unless it names it).
fn join(existing: Option<OsString>, lib: &Path) -> OsString {
    match existing.filter(|e| !e.is_empty()) {
        Some(e)
            if e.to_string_lossy()
                .split([':', ' '])
                .any(|p| Path::new(p) == lib) =>
        {
            e
        }
        Some(mut e) => {
            e.push(":");
            e.push(lib);
            e
        }
        None => lib.as_os_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lib() -> Option<PathBuf> {
        Some(PathBuf::from("/usr/lib/x/libtcmalloc_minimal.so.4"))
    }

    #[test]
    fn auto_takes_tcmalloc_where_installed_and_glibc_elsewhere() {
        assert_eq!(
            preload_from(Allocator::Auto, lib(), None).unwrap(),
            Some("/usr/lib/x/libtcmalloc_minimal.so.4".into())
        );
        assert_eq!(preload_from(Allocator::Auto, None, None).unwrap(), None);
        assert_eq!(preload_from(Allocator::Glibc, lib(), None).unwrap(), None);
    }

    #[test]
    fn asking_for_tcmalloc_where_it_is_missing_is_an_error_naming_the_package() {
        let e = preload_from(Allocator::Tcmalloc, None, None).unwrap_err();
        assert!(e.to_string().contains("libtcmalloc-minimal4"), "{e}");
    }

    #[test]
    fn an_existing_preload_is_kept_before_tcmalloc_and_not_doubled() {
        assert_eq!(
            preload_from(Allocator::Tcmalloc, lib(), Some("/opt/a.so".into())).unwrap(),
            Some("/opt/a.so:/usr/lib/x/libtcmalloc_minimal.so.4".into())
        );
        let already: OsString = "/usr/lib/x/libtcmalloc_minimal.so.4".into();
        assert_eq!(
            preload_from(Allocator::Auto, lib(), Some(already.clone())).unwrap(),
            Some(already)
        );
        assert_eq!(
            preload_from(Allocator::Auto, lib(), Some("".into())).unwrap(),
            Some("/usr/lib/x/libtcmalloc_minimal.so.4".into())
        );
    }
}
