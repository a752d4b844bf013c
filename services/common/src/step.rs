//! A Predict from the wire to checked step inputs, in one place (the
//! denoiser service and the benchmark's in-process pipeline both decode
//! with [`Step::decode`]): shapes, sizes (latent sides bounded by the
//! documented pixel side), finite values, timesteps in the model's range,
//! short ids, and each family's conditioning.

use sd_models::{Denoiser, GuidanceInput, Layout};
use sd_proto::v1::denoiser_info::FamilyParams;
use sd_proto::v1::{Dtype, Embedding, PredictRequest, SessionTensor, Tensor as WireTensor};
use tch::Tensor;

use crate::compute::{Call, Half, ReferenceTokens};
use crate::control::{ControlSpec, Hint, MAX_CONTROLS};
use crate::ip::{IpSpec, MAX_IP_ADAPTERS, MAX_PICTURES};
use crate::{finite, from_wire, ServiceError};

/// A text conditioning: the hidden states and, for the SDXL family, the
/// pooled embedding. Clones share the tensors' storage.
pub struct Cond {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

impl Clone for Cond {
    fn clone(&self) -> Self {
        Cond {
            hidden: self.hidden.shallow_clone(),
            pooled: self.pooled.as_ref().map(Tensor::shallow_clone),
        }
    }
}

impl Cond {
    /// Bytes of its tensors' data.
    pub fn data_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        bytes(&self.hidden) + self.pooled.as_ref().map_or(0, bytes)
    }
}

/// Where a step's embeddings and session tensors come from: the request's
/// tensor (checked in full, then kept), or one held by id.
pub trait Resolver {
    /// The conditioning `e` names, for a call of `batch` latents; `field`
    /// (`cond`, `uncond`) names it in errors. A sent one is checked in full
    /// ([`Bounds::sent`]) before it is kept; [`Step::decode`] checks what
    /// comes back against the bounds.
    fn embedding(&mut self, e: &Embedding, field: &str, batch: i64) -> Result<Cond, ServiceError>;

    /// The session tensor `t` names: the one it carries (not yet kept), or
    /// the one held under its id (else an embedding miss naming `field`).
    fn tensor(&mut self, t: &SessionTensor, field: &str) -> Result<Tensor, ServiceError>;

    /// Keep a sent session tensor under `id`, once [`Step::decode`] has
    /// checked it.
    fn keep(&mut self, id: &str, t: &Tensor, field: &str) -> Result<(), ServiceError>;
}

/// The session tensors a step may carry, by name.
pub const SESSION_TENSORS: [&str; 6] = [
    "time_ids",
    "negative_time_ids",
    "mask",
    "masked_image_latents",
    "reference_tokens",
    "reference_ids",
];

/// Most reference tokens a call may bring: 16 images (the OpenAI edit
/// route's limit) of 1024² pixels (the pipeline's largest) at 16 pixels a
/// token.
pub const MAX_REFERENCE_TOKENS: i64 = 16 * 64 * 64;

/// Whether `name` is a ControlNet's hint image (`control.0` … `control.7`).
fn is_control_image(name: &str) -> bool {
    name.strip_prefix("control.")
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < crate::control::MAX_CONTROLS && name.len() == 9)
}

/// Whether `name` is an IP-Adapter's image embeddings (`ip.0` … `ip.7`).
fn is_ip_embeds(name: &str) -> bool {
    name.strip_prefix("ip.")
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < crate::ip::MAX_IP_ADAPTERS && name.len() == 4)
}

/// A session tensor resolved: its value, the field naming it, and the id to
/// keep it under once checked (when it was sent).
struct Resolved {
    name: String,
    /// The id it travels under.
    id: String,
    field: String,
    tensor: Tensor,
    keep: Option<String>,
    /// It came with this request (a held one was checked when kept).
    sent: bool,
}

/// The session tensors of `req`, by name: each named once, each name known.
fn session_tensors(
    req: &PredictRequest,
    resolver: &mut dyn Resolver,
) -> Result<Vec<Resolved>, ServiceError> {
    let mut out: Vec<Resolved> = Vec::new();
    for (i, t) in req.session_tensors.iter().enumerate() {
        let field = format!("session_tensors[{i}]");
        if !SESSION_TENSORS.contains(&t.name.as_str())
            && !is_control_image(&t.name)
            && !is_ip_embeds(&t.name)
        {
            return Err(ServiceError::invalid(
                format!("{field}.name"),
                format_args!(
                    "unknown {}, expected one of {}, control.0 … control.{}, ip.0 … ip.{}",
                    sd_proto::status::quote(&t.name),
                    SESSION_TENSORS.join(", "),
                    crate::control::MAX_CONTROLS - 1,
                    crate::ip::MAX_IP_ADAPTERS - 1
                ),
            ));
        }
        if out.iter().any(|r| r.name == t.name) {
            return Err(ServiceError::invalid(
                format!("{field}.name"),
                format_args!("{} given twice", t.name),
            ));
        }
        if t.id.len() > MAX_EMBEDDING_ID_BYTES {
            return Err(ServiceError::invalid(
                format!("{field}.id"),
                format_args!("{} bytes, at most {MAX_EMBEDDING_ID_BYTES}", t.id.len()),
            ));
        }
        let field = format!("session_tensors.{}", t.name);
        let tensor = resolver.tensor(t, &field)?;
        out.push(Resolved {
            name: t.name.clone(),
            id: t.id.clone(),
            keep: (t.tensor.is_some() && !t.id.is_empty()).then(|| t.id.clone()),
            sent: t.tensor.is_some(),
            field,
            tensor,
        });
    }
    Ok(out)
}

/// One Predict's inputs, checked: the call (its LoRA adapters still to be
/// resolved by the caller: `loras` is empty) and the dtype to answer in.
pub struct Step {
    pub call: Call,
    pub out_dtype: Dtype,
    /// The ControlNets it names, checked, still to be resolved
    /// ([`crate::control::resolve`]) into `call.controls`.
    pub controls: Vec<ControlSpec>,
    /// The IP-Adapters it names, checked, still to be resolved
    /// ([`crate::ip::resolve`]) into `call.ip`.
    pub ip: Vec<IpSpec>,
}

impl Step {
    /// Check `req` against `bounds`, its embeddings and session tensors
    /// from `resolver`.
    pub fn decode(
        req: &PredictRequest,
        bounds: &Bounds,
        resolver: &mut dyn Resolver,
    ) -> Result<Step, ServiceError> {
        let latents = bounds.latents(req.latents.as_ref())?;
        let batch = latents.size()[0];
        let timesteps = bounds.timesteps(&req.timesteps, batch)?;
        let guidance = guidance(req.guidance_scale)?;
        let embedded_guidance = match (req.embedded_guidance, bounds.guidance_input) {
            (None, Some(GuidanceInput::Value)) => {
                return Err(ServiceError::invalid(
                    "embedded_guidance",
                    "missing: this guidance-distilled transformer takes its guidance here",
                ))
            }
            (None, _) => None,
            (Some(g), Some(GuidanceInput::Value)) => {
                if !g.is_finite() || !(0.0..=1000.0).contains(&g) {
                    return Err(ServiceError::invalid(
                        "embedded_guidance",
                        format_args!("{g} given, a finite value in 0..=1000 allowed"),
                    ));
                }
                Some(f64::from(g))
            }
            // schnell, SD: nothing takes it (diffusers drops it too).
            (Some(_), _) => None,
        };
        let out_dtype = output_dtype(req)?;
        let mut resolve = |e: Option<&Embedding>, field: &str| -> Result<Cond, ServiceError> {
            let e = e.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
            embedding_id(e, field)?;
            let c = resolver.embedding(e, field, batch)?;
            bounds.embedding(&c.hidden, batch, field)?;
            match (&c.pooled, bounds.pooled) {
                (Some(p), Some(_)) => bounds.pooled_fits(p, batch, &format!("{field}.pooled"))?,
                (None, None) => {}
                (Some(_), None) => {
                    return Err(ServiceError::invalid(
                        format!("{field}.pooled"),
                        "this model takes none (not an SDXL or FLUX model)",
                    ))
                }
                (None, Some(_)) => {
                    return Err(ServiceError::invalid(
                        format!("{field}.pooled"),
                        "missing: this model needs the pooled embedding",
                    ))
                }
            }
            Ok(c)
        };
        let cond = resolve(req.cond.as_ref(), "cond")?;
        // Guided when an uncond is sent and the scale is above one; a
        // network that takes guidance as an input has no unconditional branch.
        let uncond = if req.uncond.is_some() && req.guidance_scale > 1.0 {
            if matches!(bounds.guidance_input, Some(GuidanceInput::Embedding(_))) {
                return Err(ServiceError::invalid(
                    "uncond",
                    "this LCM UNet takes guidance_scale as an embedding, with no unconditional branch: send no uncond",
                ));
            }
            // A cond and uncond of different token counts (AUTOMATIC1111's
            // chunked prompts) each condition their own half of the guidance.
            Some(resolve(req.uncond.as_ref(), "uncond")?)
        } else {
            None
        };
        let mut session = session_tensors(req, resolver)?;
        let (time_ids, negative_time_ids) = time_ids(req, bounds, batch, &mut session, resolver)?;
        let (h, w) = (latents.size()[2], latents.size()[3]);
        let image = image_conditioning(bounds, (batch, h, w), &mut session, resolver)?;
        let references = references(bounds, &mut session, resolver)?;
        let controls = controls(req, bounds, (batch, h, w), &mut session, resolver)?;
        let ip = ip_adapters(req, bounds, batch, &mut session, resolver)?;
        let negative_time_ids =
            negative_time_ids.or_else(|| time_ids.as_ref().map(Tensor::shallow_clone));
        let half = |c: Cond, ids: Option<Tensor>| Half {
            context: c.hidden,
            pooled: c.pooled,
            time_ids: ids,
        };
        Ok(Step {
            call: Call {
                latents,
                timesteps,
                cond: half(cond, time_ids),
                uncond: uncond.map(|u| half(u, negative_time_ids)),
                guidance,
                embedded_guidance,
                image,
                loras: Default::default(),
                references,
                controls: Vec::new(),
                ip: Vec::new(),
            },
            out_dtype,
            controls,
            ip,
        })
    }
}

/// Longest embedding id kept (the gateway's are 36 bytes): an id travels
/// back in the details of an embedding miss, so it must stay small.
pub const MAX_EMBEDDING_ID_BYTES: usize = 128;

/// Most tokens an embedding may have: 8 CLIP windows of 77 (room for long
/// prompts encoded in chunks); cross-attention's cost grows with them.
pub const MAX_TOKENS: i64 = 77 * 8;

/// SDXL's time ids and negative time ids: each from its per-step field or
/// its session tensor, checked (and a sent one then kept).
fn time_ids(
    req: &PredictRequest,
    bounds: &Bounds,
    batch: i64,
    session: &mut Vec<Resolved>,
    resolver: &mut dyn Resolver,
) -> Result<(Option<Tensor>, Option<Tensor>), ServiceError> {
    // Each per-step field, or its session tensor; checked, then a sent
    // session tensor kept.
    let mut one = |name: &str, legacy: Option<&WireTensor>| -> Result<_, ServiceError> {
        let (t, field, keep) = match legacy {
            Some(w) => (from_wire(Some(w), name)?, name.to_string(), None),
            None => match session.iter().position(|r| r.name == name) {
                None => return Ok(None),
                Some(i) => {
                    let r = session.swap_remove(i);
                    (r.tensor, r.field, r.keep)
                }
            },
        };
        let t = bounds.time_ids(t, batch, &field)?;
        if let Some(id) = keep {
            resolver.keep(&id, &t, &field)?;
        }
        Ok(Some(t))
    };
    let time_ids = one("time_ids", req.time_ids.as_ref())?;
    let negative_time_ids = one("negative_time_ids", req.negative_time_ids.as_ref())?;
    if bounds.time_ids_len.is_some() && time_ids.is_none() {
        return Err(ServiceError::invalid(
            "time_ids",
            "missing: an SDXL-family model needs the size and crop conditioning",
        ));
    }
    Ok((time_ids, negative_time_ids))
}

/// Take the session tensor `name` out of `session`.
fn take(session: &mut Vec<Resolved>, name: &str) -> Option<Resolved> {
    let i = session.iter().position(|r| r.name == name)?;
    Some(session.swap_remove(i))
}

/// An inpainting network's image conditioning, (batch, 1 + latent
/// channels, h, w): the `mask` (1 or batch, 1, h, w), values in 0..=1, and
/// the `masked_image_latents` (1 or batch, latent channels, h, w), finite,
/// both at the latents' size (h, w); None for a network that takes none
/// (and either sent to one is refused).
fn image_conditioning(
    bounds: &Bounds,
    (batch, h, w): (i64, i64, i64),
    session: &mut Vec<Resolved>,
    resolver: &mut dyn Resolver,
) -> Result<Option<Tensor>, ServiceError> {
    let mask = take(session, "mask");
    let masked = take(session, "masked_image_latents");
    if bounds.image_channels == 0 {
        if let Some(r) = mask.as_ref().or(masked.as_ref()) {
            return Err(ServiceError::invalid(
                &r.field,
                "this network takes no image conditioning (not an inpainting model)",
            ));
        }
        return Ok(None);
    }
    let latent = bounds.image_channels - 1;
    let mut part =
        |r: Option<Resolved>, name: &str, channels: i64| -> Result<Tensor, ServiceError> {
            let Some(r) = r else {
                return Err(ServiceError::invalid(
                    format!("session_tensors.{name}"),
                    format_args!(
                        "missing: this inpainting network takes the mask and the masked image's \
                     latents beside the latents ({} channels)",
                        bounds.image_channels
                    ),
                ));
            };
            let s = r.tensor.size();
            if s.len() != 4
                || !(s[0] == 1 || s[0] == batch)
                || s[1] != channels
                || s[2] != h
                || s[3] != w
            {
                return Err(ServiceError::invalid(
                    &r.field,
                    format_args!("shape {s:?}, expected (1 or {batch}, {channels}, {h}, {w})"),
                ));
            }
            finite(&r.tensor, &r.field)?;
            let t = r.tensor.to_kind(tch::Kind::Float);
            if name == "mask" {
                let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
                if lo < 0.0 || hi > 1.0 {
                    return Err(ServiceError::invalid(
                        &r.field,
                        format_args!("values {lo}..={hi}, expected 0..=1"),
                    ));
                }
            }
            if let Some(id) = &r.keep {
                resolver.keep(id, &t, &r.field)?;
            }
            Ok(t.expand([batch, channels, h, w], false))
        };
    let mask = part(mask, "mask", 1)?;
    let masked = part(masked, "masked_image_latents", latent)?;
    Ok(Some(Tensor::cat(&[mask, masked], 1)))
}

/// FLUX.2 Klein's reference images: `reference_tokens` (1, n, latent
/// channels) and `reference_ids` (n, 4), both finite, the positions whole
/// numbers in 0..=65536, n at most [`MAX_REFERENCE_TOKENS`]; None when
/// neither is sent (and either sent to a network that takes none is
/// refused).
fn references(
    bounds: &Bounds,
    session: &mut Vec<Resolved>,
    resolver: &mut dyn Resolver,
) -> Result<Option<ReferenceTokens>, ServiceError> {
    let tokens = take(session, "reference_tokens");
    let ids = take(session, "reference_ids");
    let (tokens, ids) = match (tokens, ids) {
        (None, None) => return Ok(None),
        (Some(t), Some(i)) => (t, i),
        (Some(r), None) | (None, Some(r)) => {
            let other = if r.name == "reference_tokens" {
                "reference_ids"
            } else {
                "reference_tokens"
            };
            return Err(ServiceError::invalid(
                format!("session_tensors.{other}"),
                format_args!("missing: sent with {}", r.name),
            ));
        }
    };
    if !bounds.references {
        return Err(ServiceError::invalid(
            &tokens.field,
            "this network takes no reference images (not a FLUX.2 model)",
        ));
    }
    let c = bounds.latent_channels;
    let ts = tokens.tensor.size();
    if ts.len() != 3 || ts[0] != 1 || ts[1] < 1 || ts[2] != c {
        return Err(ServiceError::invalid(
            &tokens.field,
            format_args!("shape {ts:?}, expected (1, tokens, {c})"),
        ));
    }
    if ts[1] > MAX_REFERENCE_TOKENS {
        return Err(ServiceError::invalid(
            &tokens.field,
            format_args!("{} tokens, at most {MAX_REFERENCE_TOKENS}", ts[1]),
        ));
    }
    let is = ids.tensor.size();
    if is != [ts[1], 4] {
        return Err(ServiceError::invalid(
            &ids.field,
            format_args!("shape {is:?}, expected ({}, 4)", ts[1]),
        ));
    }
    // Values are checked once, when sent: every later step of the stream
    // names the held tensors by id.
    if tokens.sent {
        finite(&tokens.tensor, &tokens.field)?;
    }
    let positions = ids.tensor.to_kind(tch::Kind::Float);
    if ids.sent {
        finite(&ids.tensor, &ids.field)?;
        let (lo, hi) = (
            positions.min().double_value(&[]),
            positions.max().double_value(&[]),
        );
        let whole = positions.frac().abs().max().double_value(&[]) == 0.0;
        if lo < 0.0 || hi > 65536.0 || !whole {
            return Err(ServiceError::invalid(
                &ids.field,
                format_args!("values {lo}..={hi}, expected whole numbers in 0..=65536"),
            ));
        }
    }
    let tokens_t = tokens.tensor.to_kind(tch::Kind::Float);
    for (r, t) in [(&tokens, &tokens_t), (&ids, &positions)] {
        if let Some(id) = &r.keep {
            resolver.keep(id, t, &r.field)?;
        }
    }
    Ok(Some(ReferenceTokens {
        tokens: tokens_t,
        ids: positions,
    }))
}

/// The ControlNets a call names: each its own hint image (a session
/// tensor `control.N`), at scales in 0..=10; the image (1 or batch, 3,
/// h·scale, w·scale), values in 0..=1 (checked when sent; held ones are
/// the embeddings made of them). Hint images no control names are refused.
fn controls(
    req: &PredictRequest,
    bounds: &Bounds,
    (batch, h, w): (i64, i64, i64),
    session: &mut Vec<Resolved>,
    resolver: &mut dyn Resolver,
) -> Result<Vec<ControlSpec>, ServiceError> {
    if req.controls.len() > MAX_CONTROLS {
        return Err(ServiceError::invalid(
            "controls",
            format_args!("{} given, at most {MAX_CONTROLS}", req.controls.len()),
        ));
    }
    if !req.controls.is_empty() && bounds.control_scale == 0 {
        return Err(ServiceError::invalid(
            "controls",
            "this model's network takes no ControlNet (SD 1.x/2.x and SDXL UNets and the \
             FLUX.1 transformer do)",
        ));
    }
    let hint_shape = bounds.hint_shape(h, w);
    let mut out = Vec::with_capacity(req.controls.len());
    for (i, c) in req.controls.iter().enumerate() {
        let field = format!("controls[{i}]");
        let scale_ok = |s: f32| s.is_finite() && (0.0..=10.0).contains(&s);
        let uncond = c.uncond_scale.unwrap_or(c.scale);
        for (name, s) in [("scale", c.scale), ("uncond_scale", uncond)] {
            if !scale_ok(s) {
                return Err(ServiceError::invalid(
                    format!("{field}.{name}"),
                    format_args!("{s} given, a finite value in 0..=10 allowed"),
                ));
            }
        }
        let Some(r) = take(session, &c.image) else {
            return Err(ServiceError::invalid(
                format!("{field}.image"),
                format_args!(
                    "names no session tensor sent with this call ({})",
                    sd_proto::status::quote(&c.image)
                ),
            ));
        };
        // A held tensor is the embedding made of the image, or the image
        // itself when no step had named it yet (told apart by its size).
        let held_image = !r.sent && r.tensor.size().get(1..) == Some(&hint_shape[..]);
        let hint = if r.sent || held_image {
            let t = control_image(&r, batch, hint_shape, bounds.control_latents)?;
            Hint::Image {
                image: t,
                keep: if r.sent { r.keep } else { Some(r.id) },
                field: r.field,
            }
        } else {
            Hint::Embedded(r.tensor)
        };
        out.push(ControlSpec {
            name: c.name.clone(),
            field,
            hint,
            scale: f64::from(c.scale),
            uncond_scale: f64::from(uncond),
            soft: c.soft,
            mode: c.union_mode.map(i64::from),
        });
    }
    // Hint images no control names this step (outside their windows):
    // checked and held as they are until one does.
    for r in session
        .iter()
        .filter(|r| r.sent && is_control_image(&r.name))
    {
        let t = control_image(r, batch, hint_shape, bounds.control_latents)?;
        if let Some(id) = &r.keep {
            resolver.keep(id, &t, &r.field)?;
        }
    }
    Ok(out)
}

/// The IP-Adapters a call names: each its own image embeddings (a session
/// tensor `ip.N`: (1 or batch, pictures, width), finite), at scales in
/// 0..=10. Embeddings no adapter names this step are held for later ones.
fn ip_adapters(
    req: &PredictRequest,
    bounds: &Bounds,
    batch: i64,
    session: &mut Vec<Resolved>,
    resolver: &mut dyn Resolver,
) -> Result<Vec<IpSpec>, ServiceError> {
    if req.ip_adapters.len() > MAX_IP_ADAPTERS {
        return Err(ServiceError::invalid(
            "ip_adapters",
            format_args!("{} given, at most {MAX_IP_ADAPTERS}", req.ip_adapters.len()),
        ));
    }
    if !req.ip_adapters.is_empty() && bounds.control_scale == 0 {
        return Err(ServiceError::invalid(
            "ip_adapters",
            "this model's network takes no IP-Adapter (SD 1.x/2.x and SDXL UNets do)",
        ));
    }
    let check = |r: &Resolved| -> Result<Tensor, ServiceError> {
        let s = r.tensor.size();
        if s.len() != 3
            || !(s[0] == 1 || s[0] == batch)
            || !(1..=MAX_PICTURES).contains(&s[1])
            || s[2] < 1
        {
            return Err(ServiceError::invalid(
                &r.field,
                format_args!(
                    "shape {s:?}, expected (1 or {batch}, 1..={MAX_PICTURES} pictures, width)"
                ),
            ));
        }
        if r.sent {
            finite(&r.tensor, &r.field)?;
        }
        Ok(r.tensor.to_kind(tch::Kind::Float))
    };
    let mut out = Vec::with_capacity(req.ip_adapters.len());
    for (i, a) in req.ip_adapters.iter().enumerate() {
        let field = format!("ip_adapters[{i}]");
        if !a.scale.is_finite() || !(0.0..=10.0).contains(&a.scale) {
            return Err(ServiceError::invalid(
                format!("{field}.scale"),
                format_args!("{} given, a finite value in 0..=10 allowed", a.scale),
            ));
        }
        let Some(r) = take(session, &a.embeds).filter(|r| is_ip_embeds(&r.name)) else {
            return Err(ServiceError::invalid(
                format!("{field}.embeds"),
                format_args!(
                    "names no ip.N session tensor sent with this call ({})",
                    sd_proto::status::quote(&a.embeds)
                ),
            ));
        };
        let embeds = check(&r)?;
        if let Some(id) = &r.keep {
            resolver.keep(id, &embeds, &r.field)?;
        }
        out.push(IpSpec {
            name: a.name.clone(),
            field,
            embeds,
            scale: f64::from(a.scale),
        });
    }
    for r in session.iter().filter(|r| r.sent && is_ip_embeds(&r.name)) {
        let t = check(r)?;
        if let Some(id) = &r.keep {
            resolver.keep(id, &t, &r.field)?;
        }
    }
    Ok(out)
}

/// A hint (1 or batch, `shape`), finite: an image's values in 0..=1, a
/// FLUX control image's latents (`latents`) any.
fn control_image(
    r: &Resolved,
    batch: i64,
    shape: [i64; 3],
    latents: bool,
) -> Result<Tensor, ServiceError> {
    let s = r.tensor.size();
    if s.len() != 4 || !(s[0] == 1 || s[0] == batch) || s[1..] != shape {
        let [c, sh, sw] = shape;
        return Err(ServiceError::invalid(
            &r.field,
            format_args!("shape {s:?}, expected (1 or {batch}, {c}, {sh}, {sw})"),
        ));
    }
    let t = r.tensor.to_kind(tch::Kind::Float);
    if r.sent {
        finite(&t, &r.field)?;
    }
    if r.sent && !latents {
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        if lo < 0.0 || hi > 1.0 {
            return Err(ServiceError::invalid(
                &r.field,
                format_args!("values {lo}..={hi}, expected 0..=1"),
            ));
        }
    }
    Ok(t)
}

/// The limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Channels of the latents on the wire (the VAE's).
    pub latent_channels: i64,
    /// Input channels of image conditioning the network takes beside them
    /// (an inpainting UNet's 5; 0: none).
    pub image_channels: i64,
    /// How the network takes guidance as an input: an LCM UNet's
    /// embedding (then no unconditional rows), FLUX.1-dev's value.
    pub guidance_input: Option<GuidanceInput>,
    pub context_dim: i64,
    /// Width of the pooled text embedding each call brings (SDXL, FLUX).
    pub pooled: Option<i64>,
    /// The network packs 2×2 latent patches: latent sides must be even.
    pub even_sides: bool,
    /// Latents per call.
    pub max_batch: i64,
    /// Largest latent side: `--max-side` pixels over the VAE's scale factor.
    pub max_latent_side: i64,
    /// The scheduler's training timesteps: timesteps lie in [0, this].
    pub max_timestep: f32,
    /// SDXL family: time ids per latent.
    pub time_ids_len: Option<i64>,
    /// The network attends to reference images (FLUX.2).
    pub references: bool,
    /// Pixels per latent of a ControlNet's hint image (the VAE's scale);
    /// 0: the network takes no ControlNet.
    pub control_scale: i64,
    /// A ControlNet's hint is the control image's latents (FLUX), not the
    /// image.
    pub control_latents: bool,
}

impl Bounds {
    /// What the network `net`, laid out as `layout`, of a family with
    /// `params`, takes: at most `max_batch` latents a call, image sides of
    /// at most `max_side` pixels, timesteps up to `max_timestep`.
    pub fn of(
        net: &Denoiser,
        layout: &Layout,
        params: &FamilyParams,
        max_batch: i64,
        max_side: i64,
        max_timestep: f32,
    ) -> Self {
        Bounds {
            latent_channels: layout.latent_channels,
            image_channels: layout.in_channels - layout.latent_channels,
            guidance_input: net.guidance_input(),
            context_dim: net.context_dim(),
            pooled: match params {
                FamilyParams::Sd(_) | FamilyParams::Klein(_) | FamilyParams::Zimage(_) => None,
                FamilyParams::Sdxl(p) => Some(i64::from(p.pooled_dim)),
                FamilyParams::Flux(p) => Some(i64::from(p.pooled_dim)),
            },
            even_sides: layout.packed,
            max_batch,
            max_latent_side: max_side / layout.vae_scale_factor.max(1),
            max_timestep,
            time_ids_len: match params {
                FamilyParams::Sd(_)
                | FamilyParams::Flux(_)
                | FamilyParams::Klein(_)
                | FamilyParams::Zimage(_) => None,
                FamilyParams::Sdxl(p) => Some(i64::from(p.time_ids_len)),
            },
            references: net.takes_references(),
            control_scale: match net.control_base() {
                Some(sd_models::ControlBase::Unet(_)) => layout.vae_scale_factor,
                Some(sd_models::ControlBase::Flux(_)) => 1,
                None => 0,
            },
            control_latents: matches!(net.control_base(), Some(sd_models::ControlBase::Flux(_))),
        }
    }

    /// A ControlNet hint's (channels, height, width) for latents of `h`×`w`.
    fn hint_shape(&self, h: i64, w: i64) -> [i64; 3] {
        if self.control_latents {
            [self.latent_channels, h, w]
        } else {
            [3, h * self.control_scale, w * self.control_scale]
        }
    }

    /// The latents, (1..=max_batch, channels, 1..=side, 1..=side), finite.
    pub fn latents(&self, t: Option<&WireTensor>) -> Result<Tensor, ServiceError> {
        let latents = from_wire(t, "latents")?;
        let s = latents.size();
        let c = self.latent_channels;
        if s.len() != 4 || s[1] != c || s[0] < 1 || s[2] < 1 || s[3] < 1 {
            return Err(ServiceError::invalid(
                "latents",
                format_args!("shape {s:?}, expected (batch, {c}, height, width)"),
            ));
        }
        if s[0] > self.max_batch {
            return Err(ServiceError::invalid(
                "latents",
                format_args!("batch {} exceeds {}", s[0], self.max_batch),
            ));
        }
        let side = self.max_latent_side;
        if s[2] > side || s[3] > side {
            return Err(ServiceError::invalid(
                "latents",
                format_args!(
                    "{}×{} latents exceed {side}×{side} (the largest image side over the VAE's scale factor)",
                    s[3], s[2]
                ),
            ));
        }
        if self.even_sides && (s[2] % 2 != 0 || s[3] % 2 != 0) {
            return Err(ServiceError::invalid(
                "latents",
                format_args!(
                    "{}×{} latents: this network packs 2×2 patches, sides must be even",
                    s[3], s[2]
                ),
            ));
        }
        finite(&latents, "latents")?;
        Ok(latents)
    }

    /// One timestep per latent, or one for all, each in [0, max_timestep].
    pub fn timesteps(&self, timesteps: &[f32], batch: i64) -> Result<Tensor, ServiceError> {
        if !(timesteps.len() == 1 || timesteps.len() as i64 == batch) {
            return Err(ServiceError::invalid(
                "timesteps",
                format_args!("{} values given, 1 or {batch} needed", timesteps.len()),
            ));
        }
        let max = self.max_timestep;
        if let Some(i) = timesteps.iter().position(|t| !(0.0..=max).contains(t)) {
            return Err(ServiceError::invalid(
                "timesteps",
                format_args!("value {i} is {}, expected 0 to {max}", timesteps[i]),
            ));
        }
        Ok(Tensor::from_slice(timesteps))
    }

    /// An embedding sent in full: its tensors checked (shape, finite)
    /// before anything keeps them.
    pub fn sent(&self, e: &Embedding, field: &str, batch: i64) -> Result<Cond, ServiceError> {
        let hidden = from_wire(e.tensor.as_ref(), &format!("{field}.tensor"))?;
        self.embedding(&hidden, batch, field)?;
        finite(&hidden, &format!("{field}.tensor"))?;
        Ok(Cond {
            hidden,
            pooled: self.pooled(e.pooled.as_ref(), batch, field)?,
        })
    }

    /// An embedding (1 or batch, 1..=MAX_TOKENS, context dim).
    pub fn embedding(&self, t: &Tensor, batch: i64, field: &str) -> Result<(), ServiceError> {
        let s = t.size();
        let dim = self.context_dim;
        if s.len() != 3 || !(s[0] == 1 || s[0] == batch) || s[1] < 1 || s[2] != dim {
            return Err(ServiceError::invalid(
                field,
                format_args!("shape {s:?}, expected (1 or {batch}, tokens, {dim})"),
            ));
        }
        if s[1] > MAX_TOKENS {
            return Err(ServiceError::invalid(
                field,
                format_args!("{} tokens, at most {MAX_TOKENS}", s[1]),
            ));
        }
        Ok(())
    }
}

impl Bounds {
    /// SDXL: a pooled embedding (1 or batch, pooled width), finite; other
    /// models take none.
    pub fn pooled(
        &self,
        t: Option<&WireTensor>,
        batch: i64,
        field: &str,
    ) -> Result<Option<Tensor>, ServiceError> {
        let field = format!("{field}.pooled");
        match (self.pooled, t) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(ServiceError::invalid(
                field,
                "this model takes none (not an SDXL or FLUX model)",
            )),
            (Some(_), None) => Err(ServiceError::invalid(
                field,
                "missing: this model needs the pooled embedding",
            )),
            (Some(_), Some(w)) => {
                let t = from_wire(Some(w), &field)?;
                self.pooled_fits(&t, batch, &field)?;
                finite(&t, &field)?;
                Ok(Some(t))
            }
        }
    }

    /// A pooled embedding (kept or sent) fits a call of `batch`.
    pub fn pooled_fits(&self, t: &Tensor, batch: i64, field: &str) -> Result<(), ServiceError> {
        let dim = self.pooled.unwrap_or(0);
        let s = t.size();
        if s.len() != 2 || !(s[0] == 1 || s[0] == batch) || s[1] != dim {
            return Err(ServiceError::invalid(
                field,
                format_args!("shape {s:?}, expected (1 or {batch}, {dim})"),
            ));
        }
        Ok(())
    }

    /// SDXL: the time ids of each latent, (batch, time ids per latent),
    /// finite and within 0..=65536 (sizes and crops in pixels, scores).
    pub fn time_ids(&self, t: Tensor, batch: i64, field: &str) -> Result<Tensor, ServiceError> {
        let Some(n) = self.time_ids_len else {
            return Err(ServiceError::invalid(
                field,
                "this model takes none (not an SDXL-family model)",
            ));
        };
        let s = t.size();
        if s != [batch, n] {
            return Err(ServiceError::invalid(
                field,
                format_args!("shape {s:?}, expected ({batch}, {n})"),
            ));
        }
        finite(&t, field)?;
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        if lo < 0.0 || hi > 65536.0 {
            return Err(ServiceError::invalid(
                field,
                format_args!("values {lo}..={hi}, expected 0..=65536"),
            ));
        }
        Ok(t.to_kind(tch::Kind::Float))
    }
}

/// An embedding names a short id, or sends its tensor, or both.
fn embedding_id(e: &Embedding, field: &str) -> Result<(), ServiceError> {
    if e.id.len() > MAX_EMBEDDING_ID_BYTES {
        return Err(ServiceError::invalid(
            format!("{field}.id"),
            format_args!("{} bytes, at most {MAX_EMBEDDING_ID_BYTES}", e.id.len()),
        ));
    }
    if e.id.is_empty() && e.tensor.is_none() {
        return Err(ServiceError::invalid(field, "neither an id nor a tensor"));
    }
    Ok(())
}

fn guidance(scale: f32) -> Result<f64, ServiceError> {
    if !scale.is_finite() {
        return Err(ServiceError::invalid("guidance_scale", "must be finite"));
    }
    Ok(scale as f64)
}

/// The dtype to answer in: as asked, or (unspecified) the latents' own.
fn output_dtype(req: &PredictRequest) -> Result<Dtype, ServiceError> {
    match Dtype::try_from(req.output_dtype) {
        Ok(Dtype::Unspecified) => {
            Ok(Dtype::try_from(req.latents.as_ref().map_or(1, |l| l.dtype))
                .unwrap_or(Dtype::Float32))
        }
        Ok(d) => Ok(d),
        Err(_) => Err(ServiceError::invalid(
            "output_dtype",
            format_args!("unknown value {}", req.output_dtype),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::to_wire;

    pub(super) const B: Bounds = Bounds {
        latent_channels: 4,
        image_channels: 0,
        guidance_input: None,
        context_dim: 8,
        pooled: None,
        even_sides: false,
        max_batch: 2,
        max_latent_side: 16,
        max_timestep: 1000.0,
        time_ids_len: None,
        references: false,
        control_scale: 0,
        control_latents: false,
    };

    fn wire(t: &Tensor) -> WireTensor {
        to_wire(t, Dtype::Float32).unwrap()
    }

    fn field_of(e: ServiceError) -> String {
        match e {
            ServiceError::InvalidField { field, .. } => field,
            e => panic!("not a field error: {e}"),
        }
    }

    #[test]
    fn latents_are_bounded_in_shape_side_and_value() {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        assert!(B
            .latents(Some(&wire(&Tensor::zeros([2, 4, 16, 8], f))))
            .is_ok());
        for bad in [
            Tensor::zeros([3, 4, 8, 8], f),
            Tensor::zeros([1, 4, 17, 8], f),
            Tensor::zeros([1, 4, 8, 2048], f),
            Tensor::zeros([1, 3, 8, 8], f),
            Tensor::zeros([4, 8, 8], f),
            Tensor::zeros([1, 4, 8, 8], f).fill_(f64::NAN),
            Tensor::zeros([1, 4, 8, 8], f).fill_(f64::INFINITY),
        ] {
            let e = B.latents(Some(&wire(&bad))).expect_err("refused");
            assert_eq!(field_of(e), "latents", "{:?}", bad.size());
        }
        let half = Tensor::zeros([1, 4, 8, 8], f)
            .fill_(f64::NAN)
            .to_kind(tch::Kind::Half);
        let e = B
            .latents(Some(&to_wire(&half, Dtype::Float16).unwrap()))
            .expect_err("NaN in half precision refused");
        assert!(e.to_string().contains("NaN"), "{e}");
    }

    #[test]
    fn timesteps_lie_in_the_training_range() {
        assert!(B.timesteps(&[0.0, 999.5], 2).is_ok());
        assert!(B.timesteps(&[1000.0], 2).is_ok());
        for bad in [
            vec![-1.0],
            vec![1000.5],
            vec![f32::NAN],
            vec![1.0, 2.0, 3.0],
            vec![],
        ] {
            let e = B.timesteps(&bad, 2).expect_err("refused");
            assert_eq!(field_of(e), "timesteps", "{bad:?}");
        }
    }

    #[test]
    fn embeddings_are_bounded_in_tokens() {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        assert!(B
            .embedding(&Tensor::zeros([1, 77, 8], f), 2, "cond")
            .is_ok());
        let long = Tensor::zeros([1, MAX_TOKENS + 1, 8], f);
        assert_eq!(field_of(B.embedding(&long, 2, "cond").unwrap_err()), "cond");
        let wide = Tensor::zeros([3, 77, 8], f);
        assert_eq!(
            field_of(B.embedding(&wide, 2, "uncond").unwrap_err()),
            "uncond"
        );
    }
}

#[cfg(test)]
mod session_tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;
    use crate::to_wire;

    const XL: Bounds = Bounds {
        time_ids_len: Some(6),
        pooled: Some(3),
        ..super::tests::B
    };

    /// A stream's store: embeddings as sent, session tensors kept by id.
    #[derive(Default)]
    struct Stream {
        kept: HashMap<String, Tensor>,
    }

    impl Resolver for Stream {
        fn embedding(
            &mut self,
            e: &Embedding,
            field: &str,
            batch: i64,
        ) -> Result<Cond, ServiceError> {
            XL.sent(e, field, batch)
        }

        fn tensor(&mut self, t: &SessionTensor, field: &str) -> Result<Tensor, ServiceError> {
            if t.tensor.is_some() {
                return from_wire(t.tensor.as_ref(), field);
            }
            self.kept
                .get(&t.id)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: t.id.clone(),
                })
        }

        fn keep(&mut self, id: &str, t: &Tensor, _: &str) -> Result<(), ServiceError> {
            self.kept.insert(id.to_string(), t.shallow_clone());
            Ok(())
        }
    }

    fn wire(t: &Tensor) -> WireTensor {
        to_wire(t, Dtype::Float32).unwrap()
    }

    fn ids(v: f32) -> Tensor {
        Tensor::from_slice(&[v; 6]).view([1, 6])
    }

    fn session(name: &str, t: Option<&Tensor>) -> SessionTensor {
        SessionTensor {
            name: name.into(),
            id: name.into(),
            tensor: t.map(wire),
        }
    }

    fn request(session_tensors: Vec<SessionTensor>) -> PredictRequest {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let embedding = |id: &str| Embedding {
            id: id.into(),
            tensor: Some(wire(&Tensor::zeros([1, 77, 8], f))),
            pooled: Some(wire(&Tensor::zeros([1, 3], f))),
        };
        PredictRequest {
            latents: Some(wire(&Tensor::zeros([1, 4, 8, 8], f))),
            timesteps: vec![500.0],
            cond: Some(embedding("c")),
            uncond: Some(embedding("u")),
            guidance_scale: 5.0,
            session_tensors,
            ..Default::default()
        }
    }

    fn refused(r: Result<Step, ServiceError>) -> ServiceError {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    fn field(e: ServiceError) -> String {
        match e {
            ServiceError::InvalidField { field, .. }
            | ServiceError::EmbeddingMiss { field, .. } => field,
            e => panic!("not a field error: {e}"),
        }
    }

    #[test]
    fn session_tensors_are_sent_once_then_named_by_id() {
        let mut stream = Stream::default();
        let first = request(vec![
            session("time_ids", Some(&ids(64.0))),
            session("negative_time_ids", Some(&ids(32.0))),
        ]);
        let step = Step::decode(&first, &XL, &mut stream).unwrap();
        let half = |h: &Half| h.time_ids.as_ref().unwrap().double_value(&[0, 0]);
        assert_eq!(half(&step.call.cond), 64.0);
        assert_eq!(half(step.call.uncond.as_ref().unwrap()), 32.0);
        assert_eq!(stream.kept.len(), 2, "kept once checked");
        // Later steps name them by id alone.
        let later = request(vec![
            session("time_ids", None),
            session("negative_time_ids", None),
        ]);
        let step = Step::decode(&later, &XL, &mut stream).unwrap();
        assert_eq!(half(step.call.uncond.as_ref().unwrap()), 32.0);
        // A stream that lost them: a miss naming the tensor, so the caller resends.
        let e = refused(Step::decode(&later, &XL, &mut Stream::default()));
        assert!(matches!(e, ServiceError::EmbeddingMiss { .. }), "{e:?}");
        assert_eq!(field(e), "session_tensors.time_ids");
    }

    #[test]
    fn bad_session_tensors_are_refused_naming_them() {
        let mut stream = Stream::default();
        let unknown = request(vec![session("depth_hint", Some(&ids(1.0)))]);
        let e = refused(Step::decode(&unknown, &XL, &mut stream));
        assert_eq!(field(e), "session_tensors[0].name");
        // A mask for a network that takes no image conditioning.
        let mask = request(vec![
            session("time_ids", Some(&ids(1.0))),
            session("mask", Some(&ids(1.0))),
        ]);
        let e = refused(Step::decode(&mask, &XL, &mut Stream::default()));
        let f = field(e);
        assert!(f.contains("mask"), "{f}");
        let twice = request(vec![
            session("time_ids", Some(&ids(1.0))),
            session("time_ids", Some(&ids(1.0))),
        ]);
        let e = refused(Step::decode(&twice, &XL, &mut stream));
        assert_eq!(field(e), "session_tensors[1].name");
        // Out of range or misshaped: refused, and not kept.
        let huge = request(vec![session("time_ids", Some(&ids(1e9)))]);
        let e = refused(Step::decode(&huge, &XL, &mut stream));
        assert_eq!(field(e), "session_tensors.time_ids");
        let narrow = request(vec![session(
            "time_ids",
            Some(&Tensor::from_slice(&[1.0f32; 5]).view([1, 5])),
        )]);
        assert!(Step::decode(&narrow, &XL, &mut stream).is_err());
        assert!(stream.kept.is_empty());
        // None at all for an SDXL model: the size conditioning is missing.
        let e = refused(Step::decode(&request(vec![]), &XL, &mut stream));
        assert_eq!(field(e), "time_ids");
    }

    #[test]
    fn reference_tokens_travel_once_and_are_checked() {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let klein = Bounds {
            references: true,
            ..XL
        };
        let tokens = Tensor::ones([1, 6, 4], f);
        let positions = sd_models::flux2::reference_ids(&[(2, 3)], tch::Device::Cpu);
        let with = |tokens: &Tensor, ids: &Tensor| {
            request(vec![
                session("time_ids", Some(&super::session_tests::ids(1.0))),
                session("reference_tokens", Some(tokens)),
                session("reference_ids", Some(ids)),
            ])
        };
        let mut stream = Stream::default();
        let step = Step::decode(&with(&tokens, &positions), &klein, &mut stream).unwrap();
        let r = step.call.references.as_ref().unwrap();
        assert_eq!((r.len(), r.tokens.size()), (6, vec![1, 6, 4]));
        assert_eq!(step.call.key().2, 6, "calls merge by reference tokens");
        assert_eq!(
            step.call.positions(),
            8 * 8 + 6,
            "references count in the cost"
        );
        // Later steps by id.
        let later = request(vec![
            session("time_ids", Some(&super::session_tests::ids(1.0))),
            session("reference_tokens", None),
            session("reference_ids", None),
        ]);
        assert!(Step::decode(&later, &klein, &mut stream).is_ok());
        // A network without references; one half of the pair; misfits.
        let e = refused(Step::decode(&with(&tokens, &positions), &XL, &mut stream));
        assert_eq!(field(e), "session_tensors.reference_tokens");
        let alone = request(vec![
            session("time_ids", Some(&super::session_tests::ids(1.0))),
            session("reference_tokens", Some(&tokens)),
        ]);
        let e = refused(Step::decode(&alone, &klein, &mut Stream::default()));
        assert_eq!(field(e), "session_tensors.reference_ids");
        for (t, i, bad) in [
            (
                Tensor::ones([1, 6, 5], f),
                positions.shallow_clone(),
                "reference_tokens",
            ),
            (
                tokens.shallow_clone(),
                positions.narrow(0, 0, 5),
                "reference_ids",
            ),
            (tokens.shallow_clone(), &positions + 0.5, "reference_ids"),
            (tokens.shallow_clone(), &positions - 20.0, "reference_ids"),
            (
                tokens.fill(f64::NAN),
                positions.shallow_clone(),
                "reference_tokens",
            ),
        ] {
            let e = refused(Step::decode(&with(&t, &i), &klein, &mut Stream::default()));
            assert_eq!(field(e), format!("session_tensors.{bad}"));
        }
    }
}

#[cfg(test)]
mod flux_tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;
    use crate::to_wire;

    /// FLUX.1-dev's bounds: 16 packed channels, pooled 3, guidance a value.
    const FLUX: Bounds = Bounds {
        latent_channels: 16,
        image_channels: 0,
        guidance_input: Some(GuidanceInput::Value),
        context_dim: 8,
        pooled: Some(3),
        even_sides: true,
        max_batch: 2,
        max_latent_side: 16,
        max_timestep: 1000.0,
        time_ids_len: None,
        references: false,
        control_scale: 0,
        control_latents: false,
    };

    #[derive(Default)]
    struct Sent(HashMap<String, Tensor>);

    impl Resolver for Sent {
        fn embedding(
            &mut self,
            e: &Embedding,
            field: &str,
            _batch: i64,
        ) -> Result<Cond, ServiceError> {
            let hidden = crate::from_wire(e.tensor.as_ref(), field)?;
            let pooled = e
                .pooled
                .as_ref()
                .map(|p| crate::from_wire(Some(p), field))
                .transpose()?;
            Ok(Cond { hidden, pooled })
        }
        fn tensor(&mut self, t: &SessionTensor, field: &str) -> Result<Tensor, ServiceError> {
            crate::from_wire(t.tensor.as_ref(), field)
        }
        fn keep(&mut self, id: &str, t: &Tensor, _: &str) -> Result<(), ServiceError> {
            self.0.insert(id.into(), t.shallow_clone());
            Ok(())
        }
    }

    fn request(side: i64, embedded: Option<f32>) -> PredictRequest {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let wire = |t: &Tensor| to_wire(t, Dtype::Float32).unwrap();
        PredictRequest {
            latents: Some(wire(&Tensor::zeros([1, 16, side, side], f))),
            timesteps: vec![500.0],
            cond: Some(Embedding {
                id: "c".into(),
                tensor: Some(wire(&Tensor::zeros([1, 12, 8], f))),
                pooled: Some(wire(&Tensor::zeros([1, 3], f))),
            }),
            guidance_scale: 1.0,
            embedded_guidance: embedded,
            ..Default::default()
        }
    }

    fn field(r: Result<Step, ServiceError>) -> String {
        match r {
            Err(ServiceError::InvalidField { field, .. }) => field,
            Err(e) => panic!("not a field error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_distilled_transformer_needs_its_guidance_bounded_and_even_latents() {
        let step = Step::decode(&request(8, Some(3.5)), &FLUX, &mut Sent::default()).unwrap();
        assert_eq!(step.call.embedded_guidance, Some(3.5));
        for (req, want) in [
            (request(8, None), "embedded_guidance"),
            (request(8, Some(f32::NAN)), "embedded_guidance"),
            (request(8, Some(1e30)), "embedded_guidance"),
            (request(7, Some(3.5)), "latents"),
        ] {
            assert_eq!(field(Step::decode(&req, &FLUX, &mut Sent::default())), want);
        }
    }
}
