//! Used from the `build.rs` of every crate whose binaries or tests link libtorch.
//!
//! torch-sys finds libtorch (with `LIBTORCH_USE_PYTORCH=1`, in the project's
//! venv) and tells direct dependents where it is through the `links = "tch"`
//! metadata (`DEP_TCH_LIBTORCH_LIB`). We turn that into an rpath, so built
//! binaries run without anyone exporting `LD_LIBRARY_PATH`.
//!
//! CUDA: the pip wheel's `libtorch_cuda.so` would be dropped by the linker under
//! `--as-needed` (nothing references its symbols directly), so tch would see no
//! GPU. sd-models loads it at start when a CUDA device is asked for (see its
//! `device` module); the rpath set here is what lets that `dlopen` find it.

/// Emit the link arguments for this package's binaries, tests and benches.
///
/// The calling package must depend on `torch-sys` directly, or cargo does not
/// pass it `DEP_TCH_LIBTORCH_LIB`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
            println!("cargo:rustc-env=SD_LIBTORCH_LIB={dir}");
        }
        Err(_) => println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: add torch-sys as a direct dependency \
             so binaries get an rpath to libtorch"
        ),
    }
}
