//! Every Generate field is checked before any model work, and a bad value is
//! INVALID_ARGUMENT naming the field.

#![allow(clippy::unwrap_used)]

use sd_gateway::facts::ModelFacts;
use sd_gateway::limits::Limits;
use sd_gateway::plan::Plan;
use sd_proto::status::field_violations;
use sd_proto::v1::{CostPoint, ForwardCost, GenerateRequest};
use sd_sampling::{SchedulerConfig, SchedulerKind};
use tonic::{Code, Status};

fn facts() -> ModelFacts {
    ModelFacts::sd15_example()
}

fn req() -> GenerateRequest {
    GenerateRequest {
        prompt: "a cat".into(),
        ..Default::default()
    }
}

fn plan(r: GenerateRequest) -> Result<Plan, Status> {
    Plan::new(r, &facts(), &Limits::default()).map_err(Status::from)
}

fn refused(r: GenerateRequest, field: &str) {
    let e = plan(r).expect_err("should be refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().starts_with(field),
        "`{}` should name {field}",
        e.message()
    );
    // Clients read the field from the details, not the text.
    let violations = field_violations(&e);
    assert_eq!(violations.len(), 1, "{e:?}");
    assert_eq!(violations[0].field, field);
}

#[test]
fn defaults_follow_diffusers() {
    let p = plan(req()).unwrap();
    assert_eq!(
        (p.width, p.height, p.steps, p.guidance, p.num_images),
        (512, 512, 50, 7.5, 1)
    );
    assert_eq!(p.scheduler, SchedulerKind::Pndm);
    let params = p.parameters();
    assert_eq!(params.seed, p.seed);
    // Unseeded requests draw their own seeds.
    let seeds: std::collections::HashSet<u64> = (0..8).map(|_| plan(req()).unwrap().seed).collect();
    assert!(seeds.len() > 1, "eight unseeded plans share {seeds:?}");
}

#[test]
fn a_scheduler_that_cannot_run_the_request_is_refused_before_any_model_work() {
    // 120 steps fit the limits but not a schedule trained on 100 timesteps.
    let facts = ModelFacts {
        scheduler_config: SchedulerConfig::from_json(
            r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 100}"#,
        )
        .unwrap(),
        ..facts()
    };
    let e = Plan::new(
        GenerateRequest {
            steps: 120,
            ..req()
        },
        &facts,
        &Limits::default(),
    )
    .map_err(Status::from)
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The step count is what cannot be run: the field named is `steps`.
    assert_eq!(field_violations(&e)[0].field, "steps", "{}", e.message());
}

#[test]
fn each_field_is_checked() {
    refused(
        GenerateRequest {
            width: 500,
            ..req()
        },
        "width",
    );
    refused(
        GenerateRequest {
            height: 4096,
            ..req()
        },
        "height",
    );
    refused(
        GenerateRequest {
            steps: 1000,
            ..req()
        },
        "steps",
    );
    refused(
        GenerateRequest {
            guidance_scale: Some(f32::NAN),
            ..req()
        },
        "guidance_scale",
    );
    refused(
        GenerateRequest {
            guidance_scale: Some(f32::INFINITY),
            ..req()
        },
        "guidance_scale",
    );
}

#[test]
fn scheduler_options_are_checked() {
    refused(
        GenerateRequest {
            scheduler: "k_dpm_fast".into(),
            ..req()
        },
        "scheduler",
    );
    refused(
        GenerateRequest {
            karras: true,
            scheduler: "ddim".into(),
            ..req()
        },
        "karras",
    );
    refused(
        GenerateRequest {
            eta: 0.5,
            scheduler: "euler".into(),
            ..req()
        },
        "eta",
    );
    refused(
        GenerateRequest {
            eta: -1.0,
            scheduler: "ddim".into(),
            ..req()
        },
        "eta",
    );
    // A huge name is quoted, not echoed.
    let e = plan(GenerateRequest {
        scheduler: "x".repeat(1 << 20),
        ..req()
    })
    .unwrap_err();
    assert!(e.message().len() < 300, "{} bytes", e.message().len());
}

#[test]
fn counts_prompts_and_formats_are_checked() {
    refused(
        GenerateRequest {
            num_images: 9,
            ..req()
        },
        "num_images",
    );
    refused(
        GenerateRequest {
            clip_skip: 12,
            ..req()
        },
        "clip_skip",
    );
    refused(
        GenerateRequest {
            prompt: "x".repeat(5000),
            ..req()
        },
        "prompt",
    );
    refused(
        GenerateRequest {
            negative_prompt: "x".repeat(5000),
            ..req()
        },
        "negative_prompt",
    );
    refused(
        GenerateRequest {
            strength: Some(0.5),
            ..req()
        },
        "strength",
    );
    refused(GenerateRequest { format: 9, ..req() }, "format");
}

/// A denoiser that measured 0.5 s for one row at 64×64 latents (512²).
fn costed(max_request_seconds: f64) -> (ModelFacts, Limits) {
    let cost = ForwardCost {
        points: vec![
            CostPoint {
                positions: 64,
                seconds: 0.01,
            },
            CostPoint {
                positions: 64 * 64,
                seconds: 0.5,
            },
        ],
        row_factor: 1.0,
        growth_exponent: 2.0,
    };
    let facts = ModelFacts {
        cost: sd_gateway::facts::SharedCost::new(Some(cost)),
        ..facts()
    };
    let limits = Limits {
        max_request_seconds,
        ..Limits::default()
    };
    (facts, limits)
}

#[test]
fn requests_are_bounded_in_predicted_unet_seconds() {
    let (facts, limits) = costed(600.0);
    let sized = |n: u32, steps: u32, side: u32| GenerateRequest {
        num_images: n,
        steps,
        width: side,
        height: side,
        scheduler: "ddim".into(),
        ..req()
    };
    // 512², guided (2 rows), 50 DDIM steps: 50 × 1 s.
    let p = Plan::new(sized(1, 50, 512), &facts, &limits).unwrap();
    assert!((p.predicted_seconds.unwrap() - 50.0).abs() < 1e-6);
    assert!((p.predicted_step_seconds.unwrap() - 1.0).abs() < 1e-6);
    // Unguided: one row.
    let one_row = GenerateRequest {
        guidance_scale: Some(1.0),
        ..sized(1, 50, 512)
    };
    let p = Plan::new(one_row, &facts, &limits).unwrap();
    assert!((p.predicted_seconds.unwrap() - 25.0).abs() < 1e-6);
    let refused_as = |r: GenerateRequest, limits: &Limits, field: &str| {
        let e = Status::from(Plan::new(r, &facts, limits).expect_err("too long"));
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert_eq!(field_violations(&e)[0].field, field, "{}", e.message());
        assert!(e.message().contains("predicted"), "{}", e.message());
    };
    // 8 images × 100 steps × 1 s each: 800 s; one image would fit.
    refused_as(sized(8, 100, 512), &limits, "num_images");
    // 2048²: 16× the positions, 256× the time: 256 s a step.
    refused_as(sized(1, 10, 2048), &limits, "steps");
    let (_, strict) = costed(100.0);
    refused_as(sized(1, 1, 2048), &strict, "width");
    // Image-to-image runs only the last `strength` of the steps.
    let img2img = GenerateRequest {
        init_image: tiny_png(512, 512),
        strength: Some(0.5),
        ..sized(1, 50, 512)
    };
    let p = Plan::new(img2img, &facts, &limits).unwrap();
    assert!((p.predicted_seconds.unwrap() - 25.0).abs() < 1e-6);
}

#[test]
fn init_images_are_checked_before_decoding() {
    refused(
        GenerateRequest {
            init_image: b"GIF89a....".to_vec().into(),
            ..req()
        },
        "init_image",
    );
    // A PNG signature with a truncated header.
    refused(
        GenerateRequest {
            init_image: b"\x89PNG\r\n\x1a\n\0\0".to_vec().into(),
            ..req()
        },
        "init_image",
    );
    let png = {
        let mut out = Vec::new();
        let img = image::RgbImage::from_pixel(64, 48, image::Rgb([10, 20, 30]));
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let ok = plan(GenerateRequest {
        init_image: png.clone().into(),
        ..req()
    })
    .unwrap();
    assert_eq!(
        (ok.width, ok.height),
        (64, 48),
        "img2img keeps the init image's size"
    );
    assert_eq!(ok.strength, 0.8);
    refused(
        GenerateRequest {
            init_image: png.clone().into(),
            strength: Some(1.5),
            ..req()
        },
        "strength",
    );
    refused(
        GenerateRequest {
            init_image: png.clone().into(),
            strength: Some(0.01),
            steps: 10,
            ..req()
        },
        "strength",
    );
    let truncated = png[..png.len() / 2].to_vec();
    refused(
        GenerateRequest {
            init_image: truncated.into(),
            ..req()
        },
        "init_image",
    );
}

#[test]
fn unknown_models_are_invalid_naming_the_field() {
    let e = plan(GenerateRequest {
        model: "sdxl".into(),
        ..req()
    })
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("model:"), "{}", e.message());
}

/// CRC-32 (PNG's chunk checksum), to forge headers.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A few-hundred-byte PNG whose header claims `w`×`h` RGB pixels.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    // A valid zlib stream of a few zero bytes: far too little data.
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

#[test]
fn image_bombs_are_refused_without_allocating_their_pixels() {
    // Dimension bombs: refused from the header alone.
    for (w, h) in [(20_000, 20_000), (5000, 5000), (100_000, 1)] {
        let bomb = png_claiming(w, h);
        assert!(bomb.len() < 200);
        let e = plan(GenerateRequest {
            init_image: bomb.into(),
            ..req()
        })
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().starts_with("init_image") && e.message().contains(&w.to_string()),
            "{}",
            e.message()
        );
    }
    // A plausible size but not enough data: a decode error, not a panic.
    refused(
        GenerateRequest {
            init_image: png_claiming(64, 64).into(),
            ..req()
        },
        "init_image",
    );
    // Oversize files are refused before anything is parsed.
    let limits = Limits {
        max_init_image_bytes: 1000,
        ..Limits::default()
    };
    let big = vec![0x89u8; 1001];
    let e = Plan::new(
        GenerateRequest {
            init_image: big.into(),
            ..req()
        },
        &facts(),
        &limits,
    )
    .map_err(Status::from)
    .unwrap_err();
    assert!(e.message().contains("1001 bytes"), "{}", e.message());
    // Wrong magic: a BMP and a GIF are not accepted even though `image` could decode them.
    refused(
        GenerateRequest {
            init_image: b"BM\0\0\0\0\0\0".to_vec().into(),
            ..req()
        },
        "init_image",
    );
}

fn tiny_png(w: u32, h: u32) -> bytes::Bytes {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out.into()
}

#[test]
fn lcm_refuses_more_steps_than_its_distillation_schedule_names_steps() {
    let e = Plan::new(
        GenerateRequest {
            scheduler: "lcm".into(),
            steps: 60,
            ..req()
        },
        &facts(),
        &Limits::default(),
    )
    .map_err(Status::from)
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(field_violations(&e)[0].field, "steps", "{}", e.message());
    assert!(e.message().contains("1..=50"), "{}", e.message());
    let p = plan(GenerateRequest {
        scheduler: "lcm".into(),
        steps: 4,
        ..req()
    })
    .unwrap();
    assert_eq!(p.scheduler, SchedulerKind::Lcm);
}

#[test]
fn a_request_may_set_the_timestep_spacing() {
    // Euler's own spacing here (linspace, diffusers' default for the
    // class) and trailing (what Turbo models ship) start at 999; leading
    // (SD's configs) at 750 for 4 steps.
    let first = |spacing: &str| {
        plan(GenerateRequest {
            scheduler: "euler".into(),
            steps: 4,
            timestep_spacing: spacing.into(),
            ..req()
        })
        .unwrap()
        .schedule
        .timesteps()[0]
    };
    assert_eq!(first(""), 999.0);
    assert_eq!(first("trailing"), 999.0);
    assert_eq!(first("leading"), 750.0);
    let e = plan(GenerateRequest {
        timestep_spacing: "sideways".into(),
        ..req()
    })
    .unwrap_err();
    assert_eq!(field_violations(&e)[0].field, "timestep_spacing");
}

fn flux_plan(r: GenerateRequest, dev: bool) -> Result<Plan, Status> {
    Plan::new(r, &ModelFacts::flux_example(dev), &Limits::default()).map_err(Status::from)
}

fn flux_refused(r: GenerateRequest, field: &str) {
    let e = flux_plan(r, true).expect_err("should be refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert_eq!(field_violations(&e)[0].field, field, "{}", e.message());
}

#[test]
fn flux_defaults_follow_its_pipeline_and_guidance_is_distilled() {
    let p = flux_plan(req(), true).unwrap();
    assert_eq!(
        (p.width, p.height, p.steps, p.guidance),
        (1024, 1024, 28, 3.5)
    );
    assert_eq!(p.scheduler, SchedulerKind::FlowEuler);
    assert_eq!(p.max_sequence_length, 512);
    // Distilled guidance is an input: one row, no negative prompt.
    assert!(!p.guided());
    assert_eq!(p.embedded_guidance(), Some(3.5));
    // True CFG runs with a negative prompt above 1, and not without one
    // (diffusers accepts the scale and does nothing).
    let cfg = |neg: &str, s: f32| GenerateRequest {
        negative_prompt: neg.into(),
        true_cfg_scale: Some(s),
        ..req()
    };
    let p = flux_plan(cfg("blurry", 4.0), true).unwrap();
    assert!(p.guided());
    assert_eq!((p.cfg_scale(), p.embedded_guidance()), (4.0, Some(3.5)));
    assert!(!flux_plan(cfg("", 4.0), true).unwrap().guided());
    assert!(!flux_plan(cfg("blurry", 1.0), true).unwrap().guided());
    // schnell: 4 steps, no guidance input.
    let s = flux_plan(req(), false).unwrap();
    assert_eq!((s.steps, s.embedded_guidance()), (4, None));
    // "euler" is a flow model's Euler.
    let e = flux_plan(
        GenerateRequest {
            scheduler: "euler".into(),
            ..req()
        },
        true,
    )
    .unwrap();
    assert_eq!(e.scheduler, SchedulerKind::FlowEuler);
}

#[test]
fn flux_fields_are_bounded_and_refused_by_name() {
    let with = |f: fn(&mut GenerateRequest)| {
        let mut r = req();
        f(&mut r);
        r
    };
    // Sides are multiples of 16 (2×2 patches of 8-pixel latents).
    flux_refused(with(|r| r.width = 1000), "width");
    flux_refused(with(|r| r.height = 520), "height");
    flux_refused(with(|r| r.max_sequence_length = 513), "max_sequence_length");
    flux_refused(
        with(|r| r.true_cfg_scale = Some(f32::NAN)),
        "true_cfg_scale",
    );
    flux_refused(with(|r| r.true_cfg_scale = Some(-1.0)), "true_cfg_scale");
    // Schedulers of noise-prediction models do not fit a flow model.
    for s in ["ddim", "euler-a", "dpmpp-2m", "lcm"] {
        flux_refused(
            with(match s {
                "ddim" => |r: &mut GenerateRequest| r.scheduler = "ddim".into(),
                "euler-a" => |r: &mut GenerateRequest| r.scheduler = "euler-a".into(),
                "dpmpp-2m" => |r: &mut GenerateRequest| r.scheduler = "dpmpp-2m".into(),
                _ => |r: &mut GenerateRequest| r.scheduler = "lcm".into(),
            }),
            "scheduler",
        );
    }
    flux_refused(with(|r| r.karras = true), "karras");
    flux_refused(
        with(|r| r.timestep_spacing = "trailing".into()),
        "timestep_spacing",
    );
    flux_refused(with(|r| r.clip_skip = 1), "clip_skip");
    assert!(flux_plan(with(|r| r.max_sequence_length = 77), true).is_ok());
    // …and an SD model refuses FLUX's fields and scheduler by name.
    refused(with(|r| r.true_cfg_scale = Some(2.0)), "true_cfg_scale");
    refused(with(|r| r.max_sequence_length = 256), "max_sequence_length");
    refused(with(|r| r.scheduler = "flow-euler".into()), "scheduler");
}
