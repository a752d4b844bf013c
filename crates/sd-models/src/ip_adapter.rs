//! IP-Adapters (image prompts) on a UNet: a picture's CLIP `image_embeds`
//! projected into a few tokens (`image_proj`: a linear layer to 4 tokens,
//! a layer norm), which every cross-attention layer attends to beside the
//! text — the same query, its own keys and values (`to_k_ip`, `to_v_ip`),
//! its own softmax — scaled and added to the text attention's output
//! before `to_out`, as diffusers' IP-Adapter attention processor does.
//!
//! Which rows attend to which adapter's tokens, at what scale, is a plan
//! for one forward (a thread-local, as LoRA's): rows without an image
//! prompt are untouched, so requests with different adapters, scales or
//! none share a forward.
//!
//! Files load in the published layout (`ip-adapter_sd15.safetensors`,
//! `ip-adapter_sdxl.safetensors`): `image_proj.proj`, `image_proj.norm`,
//! and `ip_adapter.{k}.to_{k,v}_ip` with k = 1, 3, 5, … numbering the
//! UNet's cross-attention layers in diffusers' order (down blocks, up
//! blocks, then the mid block). The "plus" adapters' Resampler is not
//! served (refused by name).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tch::Tensor;

use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{attention, LayerNorm, Linear};
use crate::unet::UNet;
use crate::weights::{Vb, Weights};

/// A loaded IP-Adapter.
pub struct IpAdapter {
    proj: Linear,
    norm: LayerNorm,
    /// Tokens per picture.
    tokens: i64,
    /// Width of the tokens (the UNet's cross-attention width).
    width: i64,
    /// Width of the `image_embeds` it takes.
    embed_dim: i64,
    /// Each cross-attention layer's keys and values, by its diffusers path.
    layers: HashMap<String, (Linear, Linear)>,
    placement: Placement,
    parameters: u64,
    _storage: crate::weights::Storage,
}

impl IpAdapter {
    /// The adapter at `path`, fitted to `unet`.
    pub fn load(path: &Path, unet: &UNet, placement: Placement) -> Result<Self> {
        let w = Weights::open(path, placement)?;
        let unsupported = |message: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        if w.contains("image_proj.latents") || w.contains("image_proj.proj_in.weight") {
            return Err(unsupported(
                "an IP-Adapter plus (a Resampler over the encoder's hidden states): not served; \
                 the plain adapters are"
                    .into(),
            ));
        }
        let Some(&[out, embed_dim]) = w.shape_of("image_proj.proj.weight") else {
            return Err(unsupported(
                "not an IP-Adapter: no `image_proj.proj.weight` (a 2-d tensor)".into(),
            ));
        };
        let width = unet.config().context_dim();
        if width <= 0 || out % width != 0 {
            return Err(unsupported(format!(
                "its image projection makes {out} values, not tokens of this UNet's \
                 cross-attention width {width}: an adapter for another model"
            )));
        }
        let keys = unet.cross_attention_keys();
        let mut layers = HashMap::new();
        for (m, key) in keys.iter().enumerate() {
            let k = 2 * m + 1;
            let name = |n: &str| format!("ip_adapter.{k}.{n}");
            let Some(&[hidden, cross]) = w.shape_of(&name("to_k_ip.weight")) else {
                return Err(unsupported(format!(
                    "no `{}`: made for a UNet with fewer than {} cross-attention layers",
                    name("to_k_ip.weight"),
                    keys.len()
                )));
            };
            let vb = Vb::root(&w, &format!("ip_adapter.{k}"));
            layers.insert(
                key.clone(),
                (
                    Linear::load(&vb.pp("to_k_ip"), cross, hidden, false)?,
                    Linear::load(&vb.pp("to_v_ip"), cross, hidden, false)?,
                ),
            );
        }
        if w.contains(&format!("ip_adapter.{}.to_k_ip.weight", 2 * keys.len() + 1)) {
            return Err(unsupported(format!(
                "made for a UNet with more than this one's {} cross-attention layers",
                keys.len()
            )));
        }
        let vb = Vb::root(&w, "image_proj");
        Ok(IpAdapter {
            proj: Linear::load(&vb.pp("proj"), embed_dim, out, true)?,
            norm: LayerNorm::load(&vb.pp("norm"), width, 1e-5)?,
            tokens: out / width,
            width,
            embed_dim,
            layers,
            placement,
            parameters: w.parameter_count(),
            _storage: w.storage(),
        })
    }

    /// Width of the image embeddings it takes.
    pub fn embed_dim(&self) -> i64 {
        self.embed_dim
    }

    /// Bytes of its weights in memory.
    pub fn bytes(&self) -> u64 {
        self.parameters * self.placement.kind.elt_size_in_bytes() as u64
    }

    /// The tokens of `embeds` (rows, pictures, embed_dim): (rows,
    /// pictures × tokens, width) on the device — every picture's tokens in
    /// one sequence, as diffusers joins several.
    pub fn project(&self, embeds: &Tensor) -> Result<Tensor> {
        let s = embeds.size();
        if s.len() != 3 || s[0] < 1 || s[1] < 1 || s[2] != self.embed_dim {
            return Err(ModelError::Input(format!(
                "image embeddings {s:?}: expected (rows, pictures, {})",
                self.embed_dim
            )));
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let e = embeds.to_device(device).to_kind(kind);
            let y = self.proj.forward(&e.view([s[0] * s[1], s[2]]));
            let y = self
                .norm
                .forward(&y.view([s[0] * s[1], self.tokens, self.width]));
            Ok(y.view([s[0], s[1] * self.tokens, self.width]))
        })
    }
}

// SAFETY: weights written once at load, only read afterwards.
unsafe impl Sync for IpAdapter {}
unsafe impl Send for IpAdapter {}

/// Rows of a forward that attend to an adapter's tokens.
pub struct IpRows {
    pub start: i64,
    pub len: i64,
    pub adapter: Arc<IpAdapter>,
    /// (1 or len, tokens, width), from [`IpAdapter::project`].
    pub tokens: Tensor,
    pub scale: f64,
}

thread_local! {
    static PLAN: RefCell<Vec<IpRows>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` (a UNet forward) with `rows` attending to their image prompts.
pub fn with_plan<R>(rows: Vec<IpRows>, f: impl FnOnce() -> R) -> R {
    struct Reset(Vec<IpRows>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let previous = std::mem::take(&mut self.0);
            PLAN.with(|p| *p.borrow_mut() = previous);
        }
    }
    let previous = PLAN.with(|p| std::mem::replace(&mut *p.borrow_mut(), rows));
    let _reset = Reset(previous);
    f()
}

/// What the planned image prompts add to the cross-attention layer `key`'s
/// output for queries `q` (B, L, dim), before `to_out`; None when no row
/// has one.
pub(crate) fn contribution(key: &str, q: &Tensor, heads: i64, upcast: bool) -> Option<Tensor> {
    PLAN.with(|p| {
        let plan = p.borrow();
        let mut out: Option<Tensor> = None;
        for r in plan.iter() {
            let Some((to_k, to_v)) = r.adapter.layers.get(key) else {
                continue;
            };
            let rows = q.narrow(0, r.start, r.len);
            let mut size = r.tokens.size();
            size[0] = r.len;
            let tokens = r
                .tokens
                .to_device(q.device())
                .to_kind(q.kind())
                .expand(size, false);
            let a = attention(
                &rows,
                &to_k.forward(&tokens),
                &to_v.forward(&tokens),
                heads,
                false,
                upcast,
            ) * r.scale;
            let acc = out.get_or_insert_with(|| q.zeros_like());
            let mut part = acc.narrow(0, r.start, r.len);
            part += a;
        }
        out
    })
}
