//! IP-Adapters on a denoiser's calls: the files of `--ip-adapter-dir`, the
//! adapters a Predict names (their image embeddings a session tensor
//! `ip.N`, checked in [`crate::step::Step::decode`]), resolved here into
//! tokens for the conditional rows and, as diffusers guides, the tokens of
//! zero embeddings for the unconditional ones.

use std::path::PathBuf;
use std::sync::Arc;

use sd_models::ip_adapter::IpAdapter;
use sd_models::{Denoiser, Placement};
use sd_proto::v1::IpAdapterInfo;
use tch::Tensor;

use crate::ServiceError;

/// Most IP-Adapters on one call.
pub const MAX_IP_ADAPTERS: usize = 8;

/// Most pictures one adapter reads at once.
pub const MAX_PICTURES: i64 = 16;

impl crate::folder::Item for IpAdapter {
    fn bytes(&self) -> u64 {
        IpAdapter::bytes(self)
    }
}

/// The IP-Adapters of `--ip-adapter-dir`.
pub type IpStore = crate::folder::Store<IpAdapter>;

/// The `--ip-adapter-dir` flags of the denoiser.
#[derive(clap::Args, Debug, Clone)]
pub struct IpArgs {
    /// Folder of IP-Adapters requests may name (`NAME.safetensors`, the
    /// published layout) and, in `image_encoder/`, the CLIP vision encoder
    /// they read pictures with (the text encoder's).
    #[arg(long, env = "SD_IP_ADAPTER_DIR")]
    pub ip_adapter_dir: Option<PathBuf>,
    /// Memory for loaded IP-Adapters, MiB (least recently used out).
    #[arg(long, env = "SD_IP_ADAPTER_CACHE_MB", default_value_t = 1024)]
    pub ip_adapter_cache_mb: usize,
}

/// The store of `--ip-adapter-dir`, fitting adapters to `net`'s UNet (any
/// other network takes none).
pub fn store(args: &IpArgs, net: Arc<Denoiser>, placement: Placement) -> anyhow::Result<IpStore> {
    let load: crate::folder::LoadFn<IpAdapter> = if net.unet().is_some() {
        Ok(Box::new(move |path: &std::path::Path, name: &str| {
            let unet = net.unet().ok_or("not a UNet")?;
            IpAdapter::load(path, unet, placement)
                .map(|a| (a, None))
                .map_err(|e| format!("IP-Adapter `{name}`: {e}"))
        }))
    } else {
        Err("this model's network takes no IP-Adapter (SD 1.x/2.x and SDXL UNets do)")
    };
    crate::folder::Store::new(
        "IP-Adapter",
        args.ip_adapter_dir.clone(),
        args.ip_adapter_cache_mb,
        false,
        load,
    )
}

/// What a listing says of an IP-Adapter.
pub fn info<T>(l: crate::folder::Listing<T>) -> IpAdapterInfo {
    IpAdapterInfo {
        name: l.name,
        file_bytes: l.file_bytes,
        version: l.version,
        short_hash: l.short_hash,
    }
}

/// An adapter as a Predict names it, checked.
pub struct IpSpec {
    pub name: String,
    /// `ip_adapters[i]`, for errors.
    pub field: String,
    /// (1 or B, pictures, embed_dim), fp32.
    pub embeds: Tensor,
    pub scale: f64,
}

/// An adapter resolved for a call: its tokens for each half.
pub struct IpControl {
    pub adapter: Arc<crate::folder::Loaded<IpAdapter>>,
    /// (1 or B, tokens, width) for the conditional rows …
    pub cond: Tensor,
    /// … and the unconditional ones (the tokens of zero embeddings).
    pub uncond: Tensor,
    pub scale: f64,
}

impl Clone for IpControl {
    fn clone(&self) -> Self {
        IpControl {
            adapter: self.adapter.clone(),
            cond: self.cond.shallow_clone(),
            uncond: self.uncond.shallow_clone(),
            scale: self.scale,
        }
    }
}

/// Whether resolving `specs` may block (an adapter not recently checked).
pub fn needs_blocking(specs: &[IpSpec], store: &IpStore) -> bool {
    specs.iter().any(|s| store.recent(&s.name).is_none())
}

/// The adapters of a decoded step, each found (or loaded) and its tokens
/// made. Blocking when [`needs_blocking`].
pub fn resolve(specs: Vec<IpSpec>, store: &IpStore) -> Result<Vec<IpControl>, ServiceError> {
    specs
        .into_iter()
        .map(|spec| {
            let adapter = match store.recent(&spec.name) {
                Some(a) => a,
                None => store.get(&spec.name, &format!("{}.name", spec.field))?,
            };
            let dim = adapter.item.embed_dim();
            let s = spec.embeds.size();
            if s[2] != dim {
                return Err(ServiceError::invalid(
                    format!("{}.embeds", spec.field),
                    format_args!(
                        "image embeddings {s:?} for an adapter that takes {dim} wide ones: \
                         an image encoder for another adapter?"
                    ),
                ));
            }
            let tokens = |e: &Tensor| {
                adapter
                    .item
                    .project(e)
                    .map_err(|e| ServiceError::invalid(&spec.field, e))
            };
            let cond = tokens(&spec.embeds)?;
            let uncond = tokens(&Tensor::zeros(
                [1, s[1], dim],
                (tch::Kind::Float, tch::Device::Cpu),
            ))?;
            Ok(IpControl {
                adapter,
                cond,
                uncond,
                scale: spec.scale,
            })
        })
        .collect()
}
