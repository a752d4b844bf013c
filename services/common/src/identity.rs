//! A model's identity: what changes when its weights do.

/// A short identity for a model directory's weights: a hash of the configs,
/// the safetensors headers and sizes, and samples of the data. Changes when
/// the weights do, without reading gigabytes at start.
pub fn model_id(dir: &sd_models::ModelDir, components: &[sd_models::Component]) -> String {
    use std::hash::{DefaultHasher, Hasher};
    use std::io::{Read, Seek, SeekFrom};
    let mut h = DefaultHasher::new();
    for c in components {
        if let Ok(cfg) = std::fs::read(dir.config_path(*c)) {
            h.write(&cfg);
        }
        if let Ok(path) = dir.weights_path(*c, false) {
            if let Ok(mut f) = std::fs::File::open(&path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                h.write_u64(len);
                let mut buf = vec![0u8; 1 << 16];
                for pos in [0, len / 3, len / 2, len.saturating_sub(1 << 16)] {
                    if f.seek(SeekFrom::Start(pos)).is_ok() {
                        let n = f.read(&mut buf).unwrap_or(0);
                        h.write(&buf[..n]);
                    }
                }
            }
        }
    }
    let name = dir.name();
    format!("{name}@{:016x}", h.finish())
}
