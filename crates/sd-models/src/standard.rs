//! The standard configs for single-file checkpoints of the families
//! [`Standard`] recognises, shipped inside the binaries (nothing can be
//! fetched): the published diffusers configs of stable-diffusion-v1-5,
//! stable-diffusion-2-1, stable-diffusion-xl-base-1.0 and
//! stable-diffusion-xl-refiner-1.0 (`scripts/write_standard_configs.py`).
//!
//! [`config_dir`] writes a family's folder out once (to `SD_CONFIG_CACHE`,
//! or the temp dir), in the diffusers layout the loaders read, with CLIP's
//! vocabulary derived from its merges the way CLIP builds it.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::single_file::Standard;

const FILES: &[(&str, &str)] = &[
    (
        "sd-v1/model_index.json",
        include_str!("../configs/sd-v1/model_index.json"),
    ),
    (
        "sd-v1/scheduler/scheduler_config.json",
        include_str!("../configs/sd-v1/scheduler/scheduler_config.json"),
    ),
    (
        "sd-v1/text_encoder/config.json",
        include_str!("../configs/sd-v1/text_encoder/config.json"),
    ),
    (
        "sd-v1/tokenizer/special_tokens_map.json",
        include_str!("../configs/sd-v1/tokenizer/special_tokens_map.json"),
    ),
    (
        "sd-v1/tokenizer/tokenizer_config.json",
        include_str!("../configs/sd-v1/tokenizer/tokenizer_config.json"),
    ),
    (
        "sd-v1/unet/config.json",
        include_str!("../configs/sd-v1/unet/config.json"),
    ),
    (
        "sd-v1/vae/config.json",
        include_str!("../configs/sd-v1/vae/config.json"),
    ),
    (
        "sd-v2/model_index.json",
        include_str!("../configs/sd-v2/model_index.json"),
    ),
    (
        "sd-v2/scheduler/scheduler_config.json",
        include_str!("../configs/sd-v2/scheduler/scheduler_config.json"),
    ),
    (
        "sd-v2/text_encoder/config.json",
        include_str!("../configs/sd-v2/text_encoder/config.json"),
    ),
    (
        "sd-v2/tokenizer/special_tokens_map.json",
        include_str!("../configs/sd-v2/tokenizer/special_tokens_map.json"),
    ),
    (
        "sd-v2/tokenizer/tokenizer_config.json",
        include_str!("../configs/sd-v2/tokenizer/tokenizer_config.json"),
    ),
    (
        "sd-v2/unet/config.json",
        include_str!("../configs/sd-v2/unet/config.json"),
    ),
    (
        "sd-v2/vae/config.json",
        include_str!("../configs/sd-v2/vae/config.json"),
    ),
    (
        "sdxl-base/model_index.json",
        include_str!("../configs/sdxl-base/model_index.json"),
    ),
    (
        "sdxl-base/scheduler/scheduler_config.json",
        include_str!("../configs/sdxl-base/scheduler/scheduler_config.json"),
    ),
    (
        "sdxl-base/text_encoder/config.json",
        include_str!("../configs/sdxl-base/text_encoder/config.json"),
    ),
    (
        "sdxl-base/text_encoder_2/config.json",
        include_str!("../configs/sdxl-base/text_encoder_2/config.json"),
    ),
    (
        "sdxl-base/tokenizer/special_tokens_map.json",
        include_str!("../configs/sdxl-base/tokenizer/special_tokens_map.json"),
    ),
    (
        "sdxl-base/tokenizer/tokenizer_config.json",
        include_str!("../configs/sdxl-base/tokenizer/tokenizer_config.json"),
    ),
    (
        "sdxl-base/tokenizer_2/special_tokens_map.json",
        include_str!("../configs/sdxl-base/tokenizer_2/special_tokens_map.json"),
    ),
    (
        "sdxl-base/tokenizer_2/tokenizer_config.json",
        include_str!("../configs/sdxl-base/tokenizer_2/tokenizer_config.json"),
    ),
    (
        "sdxl-base/unet/config.json",
        include_str!("../configs/sdxl-base/unet/config.json"),
    ),
    (
        "sdxl-base/vae/config.json",
        include_str!("../configs/sdxl-base/vae/config.json"),
    ),
    (
        "sdxl-refiner/model_index.json",
        include_str!("../configs/sdxl-refiner/model_index.json"),
    ),
    (
        "sdxl-refiner/scheduler/scheduler_config.json",
        include_str!("../configs/sdxl-refiner/scheduler/scheduler_config.json"),
    ),
    (
        "sdxl-refiner/text_encoder_2/config.json",
        include_str!("../configs/sdxl-refiner/text_encoder_2/config.json"),
    ),
    (
        "sdxl-refiner/tokenizer_2/special_tokens_map.json",
        include_str!("../configs/sdxl-refiner/tokenizer_2/special_tokens_map.json"),
    ),
    (
        "sdxl-refiner/tokenizer_2/tokenizer_config.json",
        include_str!("../configs/sdxl-refiner/tokenizer_2/tokenizer_config.json"),
    ),
    (
        "sdxl-refiner/unet/config.json",
        include_str!("../configs/sdxl-refiner/unet/config.json"),
    ),
    (
        "sdxl-refiner/vae/config.json",
        include_str!("../configs/sdxl-refiner/vae/config.json"),
    ),
];

/// CLIP's BPE merges (the first 48,894 lines of `bpe_simple_vocab_16e6`).
const MERGES: &str = include_str!("../configs/clip-merges.txt");

/// CLIP's byte-to-character table: printable bytes stand for themselves,
/// the rest are moved up past 255, in CLIP's order.
fn byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

/// CLIP's vocabulary as vocab.json holds it: the 256 byte symbols, the same
/// with `</w>`, each merge's result, then the two special tokens.
pub fn clip_vocab_json() -> String {
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(chars.iter().map(|c| format!("{c}</w>")));
    tokens.extend(
        MERGES
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| l.replacen(' ', "", 1)),
    );
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let map: serde_json::Map<String, serde_json::Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn fingerprint() -> u64 {
    // FNV-1a over every file: a changed config gets a fresh folder.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // What is derived from the files (the inpainting folders) has a
    // version of its own.
    const DERIVED: (&str, &str) = ("derived", "inpaint folders 1");
    for (name, text) in FILES.iter().chain([&("merges", MERGES), &DERIVED]) {
        for b in name.bytes().chain(text.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder holding `family`'s standard configs in the diffusers layout
/// (written on first use).
pub fn config_dir(family: Standard) -> Result<PathBuf> {
    let cache = std::env::var_os("SD_CONFIG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let root = cache.join(format!("sdserve-configs-{:016x}", fingerprint()));
    if !root.join("complete").is_file() {
        write_all(&cache, &root)?;
    }
    Ok(root.join(family.name()))
}

/// An inpainting standard's folder: its base's files, the UNet taking 9
/// input channels, the inpainting pipeline's class; SD 2's as
/// stable-diffusion-2-inpainting (512², epsilon).
fn write_inpaint(tmp: &Path, inpaint: Standard) -> Result<()> {
    let Some((base, class)) = inpaint.inpaint_base() else {
        return Ok(());
    };
    let prefix = format!("{}/", base.name());
    let edit = |path: &str, f: &dyn Fn(&mut serde_json::Value)| -> Result<String> {
        let text = FILES
            .iter()
            .find(|(n, _)| *n == path)
            .map(|(_, t)| *t)
            .unwrap_or("{}");
        let mut v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::Config {
                path: PathBuf::from(path),
                message: e.to_string(),
            })?;
        f(&mut v);
        Ok(serde_json::to_string_pretty(&v).unwrap_or_default())
    };
    let sd2 = base == Standard::Sd2;
    for (name, text) in FILES.iter().filter(|(n, _)| n.starts_with(&prefix)) {
        let rel = &name[prefix.len()..];
        let text = match rel {
            "model_index.json" => edit(name, &|v| v["_class_name"] = class.into())?,
            "unet/config.json" => edit(name, &|v| {
                v["in_channels"] = 9.into();
                if sd2 {
                    v["sample_size"] = 64.into();
                }
            })?,
            "scheduler/scheduler_config.json" if sd2 => {
                edit(name, &|v| v["prediction_type"] = "epsilon".into())?
            }
            _ => text.to_string(),
        };
        let path = tmp.join(inpaint.name()).join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            if dir.ends_with("tokenizer") || dir.ends_with("tokenizer_2") {
                let base_dir = tmp
                    .join(base.name())
                    .join(dir.file_name().unwrap_or_default());
                for f in ["vocab.json", "merges.txt"] {
                    std::fs::copy(base_dir.join(f), dir.join(f)).map_err(io(dir))?;
                }
            }
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(())
}

fn write_all(cache: &Path, root: &Path) -> Result<()> {
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let tmp = cache.join(format!(
        ".sdserve-configs-{}-{:x}",
        std::process::id(),
        fingerprint()
    ));
    let vocab = clip_vocab_json();
    for (name, text) in FILES {
        let path = tmp.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            if dir.ends_with("tokenizer") || dir.ends_with("tokenizer_2") {
                std::fs::write(dir.join("vocab.json"), &vocab).map_err(io(dir))?;
                std::fs::write(dir.join("merges.txt"), MERGES).map_err(io(dir))?;
            }
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    for inpaint in [
        Standard::Sd1Inpaint,
        Standard::Sd2Inpaint,
        Standard::SdxlInpaint,
    ] {
        write_inpaint(&tmp, inpaint)?;
    }
    std::fs::write(tmp.join("complete"), "").map_err(io(&tmp))?;
    // Another process may have written it first: either copy will do.
    match std::fs::rename(&tmp, root) {
        Ok(()) => Ok(()),
        Err(_) if root.join("complete").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(io(root)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_has_clips_size_and_special_ids() {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&clip_vocab_json()).unwrap();
        assert_eq!(v.len(), 49408);
        assert_eq!(v["<|startoftext|>"], 49406);
        assert_eq!(v["<|endoftext|>"], 49407);
        assert_eq!(v["!"], 0);
        assert_eq!(v["!</w>"], 256);
    }
}
