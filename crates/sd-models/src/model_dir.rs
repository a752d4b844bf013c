//! A model directory in the diffusers layout, as published for SD 1.x/2.x:
//! `model_index.json`, `text_encoder/`, `tokenizer/`, `unet/`, `vae/`,
//! `scheduler/scheduler_config.json`; the SDXL family adds
//! `text_encoder_2/` and `tokenizer_2/` (the refiner has only those).
//!
//! The model's [`Family`] is decided here, once, when it is opened: from
//! `model_index.json`'s `_class_name` (a class sdserve does not serve is
//! refused by name), or for a single file from its keys.

use std::path::{Path, PathBuf};

use crate::clip::ClipTextModel;
pub use crate::component::Component;
use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::single_file::{self, Standard};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::weights::Weights;
pub use sd_proto::Family;

#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The diffusers layout: configs, tokenizers, scheduler (and, for a
    /// model directory, the weights).
    root: PathBuf,
    /// Another VAE served with the model (`--vae`), in place of `vae/`.
    vae: Option<PathBuf>,
    /// A single-file checkpoint holding every network's weights, `root`
    /// describing them.
    single_file: Option<PathBuf>,
    /// Another transformer file served with the model (`--transformer`).
    transformer: Option<PathBuf>,
    /// What the model is, decided at open.
    family: Family,
    /// How the transformer's block weights are kept (`--fp8`).
    fp8: crate::device::Fp8,
}

const PICKLE_EXTS: [&str; 4] = ["bin", "ckpt", "pt", "pth"];

impl ModelDir {
    /// A model directory in the diffusers layout, or a single-file
    /// checkpoint (`.safetensors`) of a standard family, recognised from
    /// its keys and served with that family's shipped configs.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_config(root, None)
    }

    /// As [`ModelDir::open`]; for a single-file checkpoint, `config` (a
    /// diffusers model directory: its config files, tokenizers and
    /// scheduler) describes it instead of the inferred family's configs
    /// (diffusers' `from_single_file(config=…)`).
    pub fn open_with_config(model: impl AsRef<Path>, config: Option<&Path>) -> Result<Self> {
        let model = model.as_ref().to_path_buf();
        if model.is_file() {
            return Self::single_file(model, config);
        }
        if !model.is_dir() {
            return Err(ModelError::MissingFile { path: model });
        }
        if let Some(c) = config {
            return Err(ModelError::Unsupported {
                path: c.to_path_buf(),
                message: "--config describes a single-file checkpoint; a model directory has its own configs"
                    .into(),
            });
        }
        let family = family_of(&model)?;
        Ok(ModelDir {
            root: model,
            vae: None,
            transformer: None,
            single_file: None,
            family,
            fp8: crate::device::Fp8::Off,
        })
    }

    fn single_file(file: PathBuf, config: Option<&Path>) -> Result<Self> {
        let ext = file
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if PICKLE_EXTS.contains(&ext.as_str()) {
            return Err(ModelError::Pickle { path: file });
        }
        if ext != "safetensors" {
            return Err(ModelError::Unsupported {
                path: file,
                message: "a single-file model must be a .safetensors file".into(),
            });
        }
        let root = match config {
            Some(dir) => {
                // A UNet pipeline's configs, or a FLUX one's.
                let net = ["unet", "transformer"]
                    .into_iter()
                    .find(|n| dir.join(n).join("config.json").is_file());
                if net.is_none() {
                    return Err(ModelError::MissingFile {
                        path: dir.join("unet").join("config.json"),
                    });
                }
                dir.to_path_buf()
            }
            None => {
                // Only the header is read here.
                let w = Weights::open(&file, Placement::cpu())?;
                crate::standard::config_dir(Standard::infer(&w)?)?
            }
        };
        Ok(ModelDir {
            family: family_of(&root)?,
            root,
            vae: None,
            transformer: None,
            single_file: Some(file),
            fp8: crate::device::Fp8::Off,
        })
    }

    /// The model's name: a single file's stem, or the directory's name.
    pub fn name(&self) -> String {
        let path = self.single_file.as_deref().unwrap_or(&self.root);
        let name = if self.single_file.is_some() {
            path.file_stem()
        } else {
            path.file_name()
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// The single-file checkpoint served, if it is one.
    pub fn single_file_path(&self) -> Option<&Path> {
        self.single_file.as_deref()
    }

    /// Serve the VAE in `dir` instead of the model's own: a VAE folder
    /// (`config.json` and its weights, as VAE-only repositories publish it)
    /// or a model directory with a `vae/` folder.
    pub fn with_vae(mut self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let found = [dir.to_path_buf(), dir.join("vae")]
            .into_iter()
            .find(|d| d.join("config.json").is_file())
            .ok_or_else(|| ModelError::MissingFile {
                path: dir.join("config.json"),
            })?;
        self.vae = Some(found);
        Ok(self)
    }

    /// This model with its transformer's block weights kept as `fp8` says
    /// (FLUX.1 and FLUX.2 Klein; refused for another family).
    pub fn with_fp8(mut self, fp8: crate::device::Fp8) -> Result<Self> {
        if fp8 != crate::device::Fp8::Off && !matches!(self.family, Family::Flux | Family::Klein) {
            return Err(ModelError::Unsupported {
                path: self.root.clone(),
                message: format!(
                    "fp8 weights are served for the FLUX transformers (FLUX.1, FLUX.2 Klein); this \
                     is a {} model",
                    self.family
                ),
            });
        }
        self.fp8 = fp8;
        Ok(self)
    }

    /// Serve the transformer from `file` (a FLUX transformer alone, as
    /// people download it: BFL's layout, ComfyUI's `model.diffusion_model.`
    /// prefix, or diffusers' names; bf16, fp16, fp32 or fp8) with this
    /// model's config.
    pub fn with_transformer(mut self, file: impl AsRef<Path>) -> Result<Self> {
        let file = file.as_ref();
        if self.family != Family::Flux {
            return Err(ModelError::Unsupported {
                path: file.to_path_buf(),
                message: format!(
                    "--transformer replaces a FLUX model's transformer; this is a {} model",
                    self.family
                ),
            });
        }
        if !file.is_file() {
            return Err(ModelError::MissingFile {
                path: file.to_path_buf(),
            });
        }
        if PICKLE_EXTS
            .iter()
            .any(|e| file.extension().is_some_and(|x| x.eq_ignore_ascii_case(e)))
        {
            return Err(ModelError::Pickle {
                path: file.to_path_buf(),
            });
        }
        self.transformer = Some(file.to_path_buf());
        Ok(self)
    }

    /// Where component `c`'s config and weights are.
    fn component_dir(&self, c: Component) -> PathBuf {
        match (c, &self.vae) {
            (Component::Vae, Some(v)) => v.clone(),
            _ => self.root.join(c.dir()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self, c: Component) -> PathBuf {
        self.component_dir(c).join("config.json")
    }

    pub fn scheduler_config_path(&self) -> PathBuf {
        self.root.join("scheduler").join("scheduler_config.json")
    }

    pub fn tokenizer_dir(&self) -> PathBuf {
        self.root.join("tokenizer")
    }

    /// The safetensors file for a component: `<stem>.safetensors`, or the
    /// `<stem>.fp16.safetensors` variant (preferred when running in half
    /// precision). Pickle checkpoints are refused by name, never opened.
    pub fn weights_path(&self, c: Component, prefer_fp16: bool) -> Result<PathBuf> {
        if let (Component::Transformer, Some(file)) = (c, &self.transformer) {
            return Ok(file.clone());
        }
        if let Some(file) = self.single_file_for(c) {
            return Ok(file.to_path_buf());
        }
        let dir = self.component_dir(c);
        let stem = c.stem();
        let full = dir.join(format!("{stem}.safetensors"));
        let half = dir.join(format!("{stem}.fp16.safetensors"));
        let order = if prefer_fp16 {
            [&half, &full]
        } else {
            [&full, &half]
        };
        if let Some(p) = order.into_iter().find(|p| p.is_file()) {
            return Ok(p.clone());
        }
        for ext in PICKLE_EXTS {
            for name in [format!("{stem}.{ext}"), format!("{stem}.fp16.{ext}")] {
                let p = dir.join(name);
                if p.is_file() {
                    return Err(ModelError::Pickle { path: p });
                }
            }
        }
        // Sharded (the published FLUX transformer and T5): the index.
        for variant in [
            format!("{stem}.safetensors.index.json"),
            format!("{stem}.safetensors.index.fp16.json"),
        ] {
            let p = dir.join(variant);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(ModelError::MissingFile { path: full })
    }

    pub fn open_weights(&self, c: Component, placement: Placement) -> Result<Weights> {
        let w = if let (Component::Transformer, Some(file)) = (c, &self.transformer) {
            let w = Weights::open(file, placement)?;
            single_file::flux::refuse_scaled_fp8(&w)?;
            match single_file::flux::bfl_prefix(&w) {
                Some(_) => {
                    let aliases = single_file::aliases(&w, c, &self.single_file_layout()?)?;
                    w.with_aliases(aliases)
                }
                // A file in diffusers' names.
                None => w,
            }
        } else if let Some(file) = self.single_file_for(c) {
            let w = Weights::open(file, placement)?;
            single_file::flux::refuse_scaled_fp8(&w)?;
            let aliases = single_file::aliases(&w, c, &self.single_file_layout()?)?;
            w.with_aliases(aliases)
        } else {
            let half = placement.kind != tch::Kind::Float;
            Weights::open(&self.weights_path(c, half)?, placement)?
        };
        let w = match c {
            Component::Transformer => w.with_fp8(self.fp8),
            _ => w,
        };
        // The networks LoRA adapts register their layers under their
        // diffusers names (the VAE is never adapted).
        Ok(match c {
            Component::Vae => w,
            _ => w.with_namespace(c.dir()),
        })
    }

    /// The UNet's `layers_per_block` (kohya's original block names need it).
    pub fn unet_layers_per_block(&self) -> Result<usize> {
        Ok(self.single_file_layout()?.layers_per_block)
    }

    /// The single file holding component `c`'s weights (none for a VAE
    /// served from elsewhere with `--vae`).
    fn single_file_for(&self, c: Component) -> Option<&Path> {
        match (c, &self.vae) {
            (Component::Vae, Some(_)) => None,
            _ => self.single_file.as_deref(),
        }
    }

    /// What the single-file key mapping needs from the configs.
    fn single_file_layout(&self) -> Result<single_file::Layout> {
        let count = |c: Component, key: &str| -> Result<Option<serde_json::Value>> {
            let path = self.config_path(c);
            if !path.is_file() {
                return Ok(None);
            }
            Ok(crate::config::read_json::<serde_json::Value>(&path)?
                .get(key)
                .cloned())
        };
        let layers_per_block = count(Component::Unet, "layers_per_block")?
            .and_then(|v| v.as_u64())
            .unwrap_or(2) as usize;
        let vae_blocks = count(Component::Vae, "block_out_channels")?
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(4);
        Ok(single_file::Layout {
            layers_per_block,
            vae_blocks,
        })
    }

    pub fn load_tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::load(&self.tokenizer_dir())
    }

    /// `model_index.json`, parsed (an empty object where there is none).
    fn index(&self) -> Result<serde_json::Value> {
        let path = self.root.join("model_index.json");
        if !path.is_file() {
            return Ok(serde_json::Value::Object(Default::default()));
        }
        crate::config::read_json(&path)
    }

    /// Whether the pipeline has `name` (`text_encoder_2`, ...): listed in
    /// `model_index.json` with a class, or, without an index, its folder.
    pub fn has(&self, name: &str) -> Result<bool> {
        let index = self.index()?;
        Ok(match index.get(name) {
            Some(entry) => entry.get(1).is_some_and(|class| !class.is_null()),
            None => {
                index.as_object().is_some_and(|o| o.is_empty()) && self.root.join(name).is_dir()
            }
        })
    }

    /// The model's family, decided when it was opened.
    pub fn family(&self) -> Family {
        self.family
    }

    /// SDXL's `force_zeros_for_empty_prompt` (the pipeline's default, true,
    /// where the index does not say).
    pub fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        Ok(self
            .index()?
            .get("force_zeros_for_empty_prompt")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true))
    }

    /// The refiner's `requires_aesthetics_score` (false where unsaid).
    pub fn requires_aesthetics_score(&self) -> Result<bool> {
        Ok(self
            .index()?
            .get("requires_aesthetics_score")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false))
    }

    pub fn load_tokenizer_2(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::load(&self.root.join("tokenizer_2"))
    }

    pub fn load_text_encoder_2(&self, placement: Placement) -> Result<ClipTextModel> {
        let w = self.open_weights(Component::TextEncoder2, placement)?;
        ClipTextModel::load_as(&self.config_path(Component::TextEncoder2), &w, true)
    }

    pub fn load_text_encoder(&self, placement: Placement) -> Result<ClipTextModel> {
        let w = self.open_weights(Component::TextEncoder, placement)?;
        ClipTextModel::load_as(&self.config_path(Component::TextEncoder), &w, false)
    }

    pub fn load_unet(&self, placement: Placement) -> Result<UNet> {
        let w = self.open_weights(Component::Unet, placement)?;
        UNet::load(&self.config_path(Component::Unet), &w)
    }

    /// FLUX's T5 tokenizer (`tokenizer_2/tokenizer.json`).
    pub fn load_t5_tokenizer(&self) -> Result<crate::tokenizer::T5Tokenizer> {
        crate::tokenizer::T5Tokenizer::load(&self.root.join("tokenizer_2"))
    }

    /// FLUX's T5 encoder (`text_encoder_2/`).
    pub fn load_t5(&self, placement: Placement) -> Result<crate::t5::T5Encoder> {
        let w = self.open_weights(Component::TextEncoder2, placement)?;
        crate::t5::T5Encoder::load(&self.config_path(Component::TextEncoder2), &w)
    }

    /// FLUX's transformer (`transformer/`).
    pub fn load_transformer(&self, placement: Placement) -> Result<crate::flux::FluxTransformer> {
        let w = self.open_weights(Component::Transformer, placement)?;
        crate::flux::FluxTransformer::load(&self.config_path(Component::Transformer), &w)
    }

    /// FLUX.2's transformer (`transformer/`).
    pub fn load_flux2_transformer(
        &self,
        placement: Placement,
    ) -> Result<crate::flux2::Flux2Transformer> {
        let w = self.open_weights(Component::Transformer, placement)?;
        crate::flux2::Flux2Transformer::load(&self.config_path(Component::Transformer), &w)
    }

    /// Z-Image's transformer (`transformer/`).
    pub fn load_zimage_transformer(
        &self,
        placement: Placement,
    ) -> Result<crate::zimage::ZImageTransformer> {
        let w = self.open_weights(Component::Transformer, placement)?;
        crate::zimage::ZImageTransformer::load(&self.config_path(Component::Transformer), &w)
    }

    /// A Qwen3 text encoder (`text_encoder/`: Klein's, Z-Image's).
    pub fn load_qwen3(&self, placement: Placement) -> Result<crate::qwen3::Qwen3Encoder> {
        let w = self.open_weights(Component::TextEncoder, placement)?;
        crate::qwen3::Qwen3Encoder::load(&self.config_path(Component::TextEncoder), &w)
    }

    /// Qwen's tokenizer and chat template (`tokenizer/`).
    pub fn load_qwen_tokenizer(&self) -> Result<crate::tokenizer::QwenTokenizer> {
        crate::tokenizer::QwenTokenizer::load(&self.tokenizer_dir())
    }

    /// The pipeline's `is_distilled` (FLUX.2 Klein: a step-distilled model
    /// runs no classifier-free guidance); false when unsaid.
    pub fn is_distilled(&self) -> Result<bool> {
        let index = self.root.join("model_index.json");
        let text = match std::fs::read_to_string(&index) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ModelError::Io {
                    path: index,
                    source,
                })
            }
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: index.clone(),
            message: e.to_string(),
        })?;
        Ok(v.get("is_distilled")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false))
    }

    pub fn load_vae(&self, placement: Placement) -> Result<Vae> {
        let w = self.open_weights(Component::Vae, placement)?;
        Vae::load(&self.config_path(Component::Vae), &w)
    }
}

/// The family of the pipeline in `root`: its `model_index.json`'s class, or,
/// for a directory without one (hand-made), what its folders and UNet say —
/// a second text encoder or SDXL's added conditioning make it SDXL.
fn family_of(root: &Path) -> Result<Family> {
    let index = root.join("model_index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
            path: index.clone(),
            source: e,
        })?;
        if let Some(f) =
            Family::of_model_index(&text).map_err(|message| ModelError::Unsupported {
                path: index.clone(),
                message,
            })?
        {
            return Ok(f);
        }
    }
    if root.join(Component::Transformer.dir()).is_dir()
        && !root.join(Component::Unet.dir()).is_dir()
    {
        return Ok(Family::Flux);
    }
    if root.join(Component::TextEncoder2.dir()).is_dir() {
        return Ok(Family::Sdxl);
    }
    let unet = root.join(Component::Unet.dir()).join("config.json");
    if unet.is_file() {
        let config: serde_json::Value = crate::config::read_json(&unet)?;
        if config.get("addition_embed_type").and_then(|v| v.as_str()) == Some("text_time") {
            return Ok(Family::Sdxl);
        }
    }
    Ok(Family::Sd)
}
