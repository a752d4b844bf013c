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
        let Ok(path) = dir.weights_path(*c, false) else {
            continue;
        };
        for path in shards_of(&path) {
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

/// The files whose bytes make a component's identity: the file itself, or
/// the shards a `*.index.json` lists (in the index's order).
fn shards_of(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    if !sd_models::weights::is_index(path) {
        return vec![path.to_path_buf()];
    }
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let index: Option<serde_json::Value> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut files: Vec<String> = index
        .as_ref()
        .and_then(|i| i.get("weight_map")?.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.dedup();
    let mut out = vec![path.to_path_buf()];
    out.extend(files.iter().map(|f| dir.join(f)));
    out
}
