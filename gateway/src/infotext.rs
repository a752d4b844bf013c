//! AUTOMATIC1111's infotext — the `parameters` text its PNG Info reads and
//! its API answers in `info.infotexts` — written in one place, from a
//! generation's parameters, with A1111's sampler names: an image saved from
//! any door reads back in A1111 with the sampler and schedule the API
//! answered.

use sd_proto::v1::GenerationParameters;

use crate::images::lora_tags;

/// A1111's sampler names, their aliases, the scheduler each is here, and
/// whether its "Automatic" schedule is Karras (DPM++ 2M's, since A1111 1.9).
pub const SAMPLERS: [(&str, &[&str], &str, bool); 8] = [
    ("DPM++ 2M", &["k_dpmpp_2m"], "dpmpp-2m", true),
    (
        "Euler a",
        &["k_euler_a", "k_euler_ancestral"],
        "euler-a",
        false,
    ),
    ("Euler", &["k_euler"], "euler", false),
    ("LMS", &["k_lms"], "lms", false),
    ("Heun", &["k_heun"], "heun", false),
    ("DDIM", &["ddim"], "ddim", false),
    ("PLMS", &["plms"], "pndm", false),
    ("UniPC", &["unipc"], "unipc", false),
];

/// A scheduler of ours as A1111 names it: (sampler, schedule type). A
/// scheduler A1111 lacks keeps its own name. A1111 writes the schedule
/// "Automatic" resolved to where that is a schedule of its own (DPM++ 2M's
/// Karras), and none where the model's own sigmas ran.
pub fn a1111_sampler(scheduler: &str, karras: bool) -> (&str, Option<&'static str>) {
    if scheduler == "flow-euler" {
        // Forge's name for a flow model's Euler and its schedule.
        return ("Euler", Some("Simple"));
    }
    let name = SAMPLERS
        .iter()
        .find(|(_, _, ours, _)| *ours == scheduler)
        .map_or(scheduler, |(a1111, _, _, _)| a1111);
    (name, karras.then_some("Karras"))
}

/// The infotext of one image: its prompt with the `<lora:…>` tags that
/// reproduce it, the negative prompt (a line only when there is one, as
/// A1111 writes it), then `Steps, Sampler, [Schedule type,] CFG scale,
/// Seed, Size, Model` and, when set, `Clip skip` and `Denoising strength`.
pub fn write(p: &GenerationParameters) -> String {
    write_with(p, &[])
}

/// [`write`] with the `key: value` pairs a door adds (A1111's inpainting
/// keys, …) before the version.
pub fn write_with(p: &GenerationParameters, extra: &[(String, String)]) -> String {
    let tags = lora_tags(&p.loras);
    let mut t = match (p.prompt.is_empty(), tags.is_empty()) {
        (_, true) => p.prompt.clone(),
        (true, false) => tags,
        (false, false) => format!("{} {tags}", p.prompt),
    };
    if !p.negative_prompt.is_empty() {
        t.push_str(&format!("\nNegative prompt: {}", p.negative_prompt));
    }
    let (sampler, schedule) = a1111_sampler(&p.scheduler, p.karras);
    let schedule = schedule.map_or(String::new(), |s| format!(", Schedule type: {s}"));
    // FLUX.1 (a true CFG scale is set): Forge's two scales — real CFG and
    // the distilled guidance.
    let cfg = if p.true_cfg_scale > 0.0 {
        format!(
            "CFG scale: {}, Distilled CFG Scale: {}",
            p.true_cfg_scale, p.guidance_scale
        )
    } else {
        format!("CFG scale: {}", p.guidance_scale)
    };
    t.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}{schedule}, {cfg}, Seed: {}, Size: {}x{}, Model: {}",
        p.steps, p.seed, p.width, p.height, p.model
    ));
    if p.clip_skip > 0 {
        t.push_str(&format!(", Clip skip: {}", p.clip_skip + 1));
    }
    if p.strength > 0.0 {
        t.push_str(&format!(", Denoising strength: {}", p.strength));
    }
    if let Some(h) = &p.hires {
        if p.strength == 0.0 {
            if let Some(s) = h.strength {
                t.push_str(&format!(", Denoising strength: {s}"));
            }
        }
        if !h.prompt.is_empty() && h.prompt != p.prompt {
            t.push_str(&format!(", Hires prompt: {}", quote(&h.prompt)));
        }
        if !h.negative_prompt.is_empty() && h.negative_prompt != p.negative_prompt {
            t.push_str(&format!(
                ", Hires negative prompt: {}",
                quote(&h.negative_prompt)
            ));
        }
        if h.scale > 0.0 {
            t.push_str(&format!(", Hires upscale: {}", h.scale));
        } else {
            t.push_str(&format!(", Hires resize: {}x{}", h.width, h.height));
        }
        if h.steps > 0 {
            t.push_str(&format!(", Hires steps: {}", h.steps));
        }
        t.push_str(&format!(", Hires upscaler: {}", h.upscaler));
    }
    if !p.textual_inversions.is_empty() {
        t.push_str(&format!(
            ", TI hashes: {}",
            quote(&p.textual_inversions.join(", "))
        ));
    }
    for (k, v) in extra {
        t.push_str(&format!(", {k}: {}", quote(v)));
    }
    t.push_str(&format!(", Version: sdserve {}", env!("CARGO_PKG_VERSION")));
    t
}

/// A value as A1111's infotext writes it: JSON-quoted when it holds `,`,
/// `:` or a newline.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_default()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_read_as_a1111_names_them() {
        let p = GenerationParameters {
            prompt: "a cat".into(),
            steps: 20,
            guidance_scale: 7.0,
            scheduler: "dpmpp-2m".into(),
            karras: true,
            seed: 5,
            width: 512,
            height: 512,
            model: "sd15".into(),
            ..Default::default()
        };
        let t = write(&p);
        assert!(
            t.starts_with(
                "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, \
                 Size: 512x512, Model: sd15"
            ),
            "{t}"
        );
        let t = write(&GenerationParameters {
            scheduler: "euler-a".into(),
            karras: false,
            negative_prompt: "blurry".into(),
            strength: 0.75,
            clip_skip: 1,
            ..p.clone()
        });
        assert!(t.contains("\nNegative prompt: blurry\n"), "{t}");
        assert!(t.contains("Sampler: Euler a, CFG scale: 7,"), "{t}");
        assert!(
            t.contains(", Clip skip: 2, Denoising strength: 0.75"),
            "{t}"
        );
        assert_eq!(a1111_sampler("lcm", false), ("lcm", None));
        // FLUX, as Forge writes it.
        let t = write(&GenerationParameters {
            scheduler: "flow-euler".into(),
            guidance_scale: 3.5,
            true_cfg_scale: 1.0,
            max_sequence_length: 512,
            ..p
        });
        assert!(
            t.contains(
                "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 5"
            ),
            "{t}"
        );
    }
}
