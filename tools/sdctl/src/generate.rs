//! `sdctl generate`: one GenerateStream call, a progress bar fed by its
//! events, the images written to disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{
    generate_event, GenerateRequest, GenerateResponse, ImageFormat, ListLorasRequest,
    ListModelsRequest, Preview,
};
use tokio_stream::StreamExt;

/// How to reach the gateway.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Gateway URL (https:// for TLS).
    #[arg(long, env = "SD_GATEWAY", default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// API key, sent as `authorization: Bearer KEY`.
    #[arg(long, env = "SD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA certificate (PEM) to verify the gateway's TLS certificate.
    #[arg(long, env = "SD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl Connection {
    fn request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        if let Some(k) = &self.api_key {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {k}").parse().context("API key")?,
            );
        }
        Ok(r)
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Width in pixels (default: the model's).
    #[arg(long)]
    width: Option<u32>,
    /// Height in pixels (default: the model's).
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps (default: the model's — its sdserve.json — else 50).
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale (<= 1 turns guidance off; default:
    /// the model's, 7.5, SDXL 5.0).
    #[arg(long)]
    guidance: Option<f32>,
    /// FLUX: real classifier-free guidance on top of the distilled
    /// guidance, with --negative-prompt (diffusers' true_cfg_scale; 1: off).
    #[arg(long)]
    true_cfg_scale: Option<f32>,
    /// FLUX: T5 tokens each prompt is padded or cut to (1..=512; default 512).
    #[arg(long, default_value_t = 0)]
    max_sequence_length: u32,
    /// ddim, pndm, euler, euler-a, lms, heun, dpmpp-2m, unipc, lcm; FLUX: flow-euler (or
    /// euler) (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// Karras sigmas (euler, lms, heun, dpmpp-2m, unipc).
    #[arg(long)]
    karras: bool,
    /// DDIM eta.
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Seed (default: drawn by the gateway and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    num_images: u32,
    /// Use the text encoder's hidden state this many layers before the last.
    #[arg(long, default_value_t = 0)]
    clip_skip: u32,
    /// SDXL: the original size conditioning, width (with --original-height).
    #[arg(long, default_value_t = 0)]
    original_width: u32,
    #[arg(long, default_value_t = 0)]
    original_height: u32,
    /// SDXL: the crop conditioning's top-left corner.
    #[arg(long, default_value_t = 0)]
    crop_top: u32,
    #[arg(long, default_value_t = 0)]
    crop_left: u32,
    /// SDXL: the target size conditioning (with --target-height).
    #[arg(long, default_value_t = 0)]
    target_width: u32,
    #[arg(long, default_value_t = 0)]
    target_height: u32,
    /// SDXL refiner: the aesthetic score (default 6.0).
    #[arg(long)]
    aesthetic_score: Option<f32>,
    /// The scheduler's timestep spacing: leading, trailing or linspace
    /// (default: the model's).
    #[arg(long, default_value = "")]
    timestep_spacing: String,
    /// How the prompts are read: plain (as diffusers) or a1111
    /// (AUTOMATIC1111's attention weights, BREAK, long prompts in chunks).
    #[arg(long, default_value = "plain", value_parser = ["plain", "a1111"])]
    prompt_syntax: String,
    /// A LoRA adapter to apply, NAME, NAME:SCALE (scale 1 when unsaid) or
    /// NAME:TE:UNET (the text encoder's and the UNet's scales apart);
    /// repeatable: a NAME.safetensors in the services' --lora-dir.
    #[arg(long = "lora", value_name = "NAME[:SCALE[:UNET]]", value_parser = parse_lora)]
    loras: Vec<sd_proto::v1::LoraRef>,
    /// Image-to-image: the initial image (PNG, JPEG or WebP).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// Image-to-image: how much to change the initial image, in (0, 1]
    /// (0.8; with --mask 1.0).
    #[arg(long, requires = "init_image")]
    strength: Option<f32>,
    /// Inpainting: what to repaint in the initial image (white repaints,
    /// black keeps; PNG, JPEG or WebP).
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
    /// FLUX.2 Klein: a reference image to edit from or compose with (PNG,
    /// JPEG or WebP), repeatable (at most 16); without --width/--height the
    /// first one's size.
    #[arg(long = "reference", value_name = "IMG")]
    references: Vec<PathBuf>,
    /// A ControlNet (SD, SDXL, FLUX.1) and its hint image: NAME:IMAGE, with
    /// the weight (1) and the start and end of its window (0 and 1) when
    /// given; repeatable (several are summed): a folder or .safetensors file
    /// in the denoiser's --controlnet-dir. A union ControlNet's control type
    /// follows its name: NAME/TYPE (e.g. union/2:depth.png).
    #[arg(
        long = "controlnet",
        value_name = "NAME[/TYPE]:IMAGE[:WEIGHT[:START:END]]",
        value_parser = parse_controlnet
    )]
    controlnets: Vec<ControlArg>,
    /// An IP-Adapter (SD, SDXL) and its picture: NAME:IMAGE, with the scale
    /// (1) when given; repeatable: a .safetensors file in the services'
    /// --ip-adapter-dir.
    #[arg(long = "ip-adapter", value_name = "NAME:IMAGE[:SCALE]", value_parser = parse_ip_adapter)]
    ip_adapters: Vec<(String, PathBuf, Option<f32>)>,
    /// The preprocessor every --controlnet's image goes through first:
    /// none (the image is the hint) or canny.
    #[arg(long, default_value = "none")]
    controlnet_preprocessor: String,
    /// Hires fix: after the image, an image-to-image pass at this many times
    /// its size (AUTOMATIC1111's enable_hr with hr_scale).
    #[arg(long)]
    hires_scale: Option<f32>,
    /// Hires fix: how to enlarge (Latent, Latent (nearest), …, None, Lanczos).
    #[arg(long, requires = "hires_scale")]
    hires_upscaler: Option<String>,
    /// Hires fix: the second pass's steps (0: the first pass's).
    #[arg(long, requires = "hires_scale", default_value_t = 0)]
    hires_steps: u32,
    /// Hires fix: how much the second pass changes the enlarged image (0.7).
    #[arg(long, requires = "hires_scale")]
    hires_strength: Option<f32>,
    /// Send a latent preview every this many steps, written next to the output.
    #[arg(long, default_value_t = 0)]
    preview_every: u32,
    #[command(flatten)]
    conn: Connection,
    /// Output file (.png, .jpg or .webp); N > 1 images become FILE-0.png, FILE-1.png, ...
    #[arg(long, short)]
    output: PathBuf,
}

fn format_of(path: &Path) -> ImageFormat {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg") | Some("jpeg") => ImageFormat::Jpeg,
        Some("webp") => ImageFormat::Webp,
        _ => ImageFormat::Png,
    }
}

/// FILE.png for one image, FILE-i.png for several.
pub fn output_path(base: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match base.extension() {
        Some(ext) => format!("{stem}-{i}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{i}"),
    };
    base.with_file_name(name)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn connect(conn: &Connection) -> anyhow::Result<GenerationClient<tonic::transport::Channel>> {
    let url = &conn.gateway;
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &conn.tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        ep = ep.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {url}"))?;
    Ok(GenerationClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(64 << 20))
}

/// The request the flags describe (the init image read from disk).
fn request(a: &GenerateArgs) -> anyhow::Result<GenerateRequest> {
    let init_image = match &a.init_image {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => Vec::new(),
    };
    let mask = match &a.mask {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => Vec::new(),
    };
    let reference_images = a
        .references
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(Into::into)
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let controlnets = control_units(a)?;
    let ip_adapters = a
        .ip_adapters
        .iter()
        .map(|(name, path, scale)| {
            Ok(sd_proto::v1::IpAdapterUnit {
                name: name.clone(),
                image: std::fs::read(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .into(),
                scale: *scale,
                ..Default::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let hires = a.hires_scale.map(|scale| sd_proto::v1::Hires {
        scale,
        upscaler: a.hires_upscaler.clone().unwrap_or_default(),
        steps: a.hires_steps,
        strength: a.hires_strength,
        ..Default::default()
    });
    Ok(GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        steps: a.steps.unwrap_or(0),
        guidance_scale: a.guidance,
        scheduler: a.scheduler.clone().unwrap_or_default(),
        karras: a.karras,
        eta: a.eta,
        seed: a.seed,
        num_images: a.num_images,
        clip_skip: a.clip_skip,
        init_image: init_image.into(),
        strength: a.strength,
        format: format_of(&a.output) as i32,
        preview_every: a.preview_every,
        preview_mode: 0,
        model: String::new(),
        conditioning: conditioning(a),
        timestep_spacing: a.timestep_spacing.clone(),
        prompt_syntax: if a.prompt_syntax == "a1111" {
            sd_proto::v1::PromptSyntax::A1111 as i32
        } else {
            sd_proto::v1::PromptSyntax::Plain as i32
        },
        loras: a.loras.clone(),
        true_cfg_scale: a.true_cfg_scale,
        max_sequence_length: a.max_sequence_length,
        mask: mask.into(),
        hires,
        inpaint: None,
        reference_images,
        controlnets,
        ip_adapters,
    })
}

/// `NAME:IMAGE` or `NAME:IMAGE:SCALE`.
fn parse_ip_adapter(s: &str) -> Result<(String, PathBuf, Option<f32>), String> {
    match s.split(':').collect::<Vec<_>>()[..] {
        [name, image] if !name.is_empty() && !image.is_empty() => {
            Ok((name.into(), image.into(), None))
        }
        [name, image, scale] if !name.is_empty() && !image.is_empty() => {
            let scale = scale
                .parse::<f32>()
                .map_err(|_| format!("scale `{scale}` is not a number"))?;
            Ok((name.into(), image.into(), Some(scale)))
        }
        _ => Err("expected NAME:IMAGE or NAME:IMAGE:SCALE".into()),
    }
}

/// The --controlnet units, their hint images read.
fn control_units(a: &GenerateArgs) -> anyhow::Result<Vec<sd_proto::v1::ControlUnit>> {
    a.controlnets
        .iter()
        .map(|(name, path, weight, window)| {
            let (name, union_mode) = match name.split_once('/') {
                Some((n, m)) => (
                    n.to_string(),
                    Some(m.parse::<u32>().with_context(|| {
                        format!("--controlnet {name}: the control type `{m}` is not a number")
                    })?),
                ),
                None => (name.clone(), None),
            };
            Ok(sd_proto::v1::ControlUnit {
                name,
                union_mode,
                image: std::fs::read(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .into(),
                weight: *weight,
                start: window.map(|w| w.0),
                end: window.map(|w| w.1),
                preprocessor: a.controlnet_preprocessor.clone(),
                ..Default::default()
            })
        })
        .collect()
}

/// `NAME:IMAGE`, `NAME:IMAGE:WEIGHT` or `NAME:IMAGE:WEIGHT:START:END`.
type ControlArg = (String, PathBuf, Option<f32>, Option<(f32, f32)>);

fn parse_controlnet(s: &str) -> Result<ControlArg, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let number = |v: &str, what: &str| {
        v.parse::<f32>()
            .map_err(|_| format!("{what} `{v}` is not a number"))
    };
    match parts[..] {
        [name, image] if !name.is_empty() && !image.is_empty() => {
            Ok((name.into(), image.into(), None, None))
        }
        [name, image, w] if !name.is_empty() => {
            Ok((name.into(), image.into(), Some(number(w, "weight")?), None))
        }
        [name, image, w, a, b] if !name.is_empty() => Ok((
            name.into(),
            image.into(),
            Some(number(w, "weight")?),
            Some((number(a, "start")?, number(b, "end")?)),
        )),
        _ => Err("expected NAME:IMAGE, NAME:IMAGE:WEIGHT or NAME:IMAGE:WEIGHT:START:END".into()),
    }
}

/// `NAME`, `NAME:SCALE`, or `NAME:TE:UNET` (the text encoder's and the
/// UNet's scales apart).
fn parse_lora(s: &str) -> Result<sd_proto::v1::LoraRef, String> {
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or_default();
    let scale = |v: &str| {
        v.parse::<f32>().map_err(|_| {
            format!("`{v}` is not a scale (NAME:SCALE or NAME:TE:UNET, e.g. style:0.8)")
        })
    };
    let te = parts.next().map(scale).transpose()?;
    let unet = parts.next().map(scale).transpose()?;
    if parts.next().is_some() {
        return Err(format!("`{s}`: NAME, NAME:SCALE or NAME:TE:UNET"));
    }
    if name.is_empty() {
        return Err("no LoRA name (NAME:SCALE)".into());
    }
    Ok(sd_proto::v1::LoraRef {
        name: name.to_string(),
        scale: te.unwrap_or(1.0),
        unet_scale: unet,
    })
}

/// The size conditioning flags, when any is given.
fn conditioning(a: &GenerateArgs) -> Option<sd_proto::v1::SizeConditioning> {
    let c = sd_proto::v1::SizeConditioning {
        original_width: a.original_width,
        original_height: a.original_height,
        crop_top: a.crop_top,
        crop_left: a.crop_left,
        target_width: a.target_width,
        target_height: a.target_height,
        aesthetic_score: a.aesthetic_score,
        ..Default::default()
    };
    (c != sd_proto::v1::SizeConditioning::default()).then_some(c)
}

fn progress_bar() -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    Ok(bar)
}

/// Preview images go next to the output: FILE.preview-STEP.png.
fn write_preview(output: &Path, p: &Preview) -> anyhow::Result<()> {
    for (i, img) in p.images.iter().enumerate() {
        let path = output_path(
            &output.with_extension(format!("preview-{}.png", p.step)),
            i,
            p.images.len(),
        );
        std::fs::write(&path, &img.data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Write the images and say what was written and with which parameters.
fn write_result(output: &Path, r: &GenerateResponse) -> anyhow::Result<()> {
    let n = r.images.len();
    for (i, img) in r.images.iter().enumerate() {
        let path = output_path(output, i, n);
        std::fs::write(&path, &img.data).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} ({}x{})", path.display(), img.width, img.height);
    }
    if let Some(p) = &r.parameters {
        println!(
            "seed {} · {} steps · {}{} · guidance {} · {}",
            p.seed,
            p.steps,
            p.scheduler,
            if p.karras { " karras" } else { "" },
            p.guidance_scale,
            p.model
        );
    }
    Ok(())
}

pub async fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let request = request(&a)?;
    let mut client = connect(&a.conn).await?;
    let mut stream = client
        .generate_stream(a.conn.request(request)?)
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = progress_bar()?;
    while let Some(event) = stream.next().await {
        let event = event.map_err(|s| {
            bar.abandon();
            status_error(s)
        })?;
        match event.event {
            Some(generate_event::Event::Progress(p)) => {
                bar.set_length(p.total as u64);
                bar.set_position(p.step as u64);
                bar.set_message(format!("t={:.0}", p.timestep));
            }
            Some(generate_event::Event::Preview(p)) => write_preview(&a.output, &p)?,
            Some(generate_event::Event::Result(r)) => {
                bar.finish_and_clear();
                return write_result(&a.output, &r);
            }
            None => {}
        }
    }
    anyhow::bail!("the gateway closed the stream without a result")
}

pub async fn models(conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    let r = client
        .list_models(conn.request(ListModelsRequest {})?)
        .await
        .map_err(status_error)?
        .into_inner();
    for m in r.models {
        println!(
            "{}  {}x{}  scheduler {}  {}  ({})",
            m.name, m.default_width, m.default_height, m.default_scheduler, m.prediction_type, m.id
        );
    }
    Ok(())
}

/// The LoRA adapters a gateway's model can apply (`--lora-dir`), with
/// each file's size.
pub async fn loras(conn: &Connection, model: &str) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    let r = client
        .list_loras(conn.request(ListLorasRequest {
            model: model.to_string(),
            ..Default::default()
        })?)
        .await
        .map_err(status_error)?
        .into_inner();
    if r.loras.is_empty() {
        eprintln!(
            "no LoRA adapters (the services were started without --lora-dir, or it is empty)"
        );
    }
    for l in r.loras {
        println!(
            "{}  {:.1} MiB",
            l.name,
            l.file_bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_images_get_numbered_names() {
        assert_eq!(
            output_path(Path::new("out/a.png"), 0, 1),
            PathBuf::from("out/a.png")
        );
        assert_eq!(
            output_path(Path::new("out/a.png"), 1, 2),
            PathBuf::from("out/a-1.png")
        );
        assert_eq!(format_of(Path::new("x.JPG")), ImageFormat::Jpeg);
    }

    #[test]
    fn lora_flags_give_one_scale_or_the_text_encoders_and_the_unets() {
        let l = |s: &str| parse_lora(s).map(|r| (r.name, r.scale, r.unet_scale));
        assert_eq!(l("ink"), Ok(("ink".into(), 1.0, None)));
        assert_eq!(l("ink:0.8"), Ok(("ink".into(), 0.8, None)));
        assert_eq!(l("ink:0.8:0.3"), Ok(("ink".into(), 0.8, Some(0.3))));
        assert!(l("ink:x").unwrap_err().contains("`x`"));
        assert!(l("ink:1:2:3").is_err());
        assert!(l(":1").is_err());
    }
}
