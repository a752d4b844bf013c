//! The one place the protocol is generated: into OUT_DIR, with a descriptor
//! set for server reflection. protoc comes from protoc-bin-vendored, so
//! nothing needs installing.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded here; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = [
        "tensor",
        "family",
        "text_encoder",
        "denoiser",
        "autoencoder",
        "generation",
    ]
    .iter()
    .map(|f| root.join(format!("sd/v1/{f}.proto")))
    .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("sd_v1_descriptor.bin"))
        .bytes(".sd.v1")
        // Decode errors are the sender's: INVALID_ARGUMENT (see codec.rs).
        .codec_path("crate::codec::SdCodec")
        .compile_protos(&files, &[root])?;
    Ok(())
}
