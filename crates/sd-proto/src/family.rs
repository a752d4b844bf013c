//! The model family, decided once: which diffusers pipeline classes sdserve
//! serves and the family each belongs to. The model crate reads a model's
//! `model_index.json` through this table, `sdctl up` checks a model with it
//! before starting anything, and the wire carries the family as
//! [`v1::ModelFamily`]. Adding a family is a new variant here, and then a
//! compile error at each `match` that has to decide what it means.

use std::fmt;

use crate::v1;

/// A family of models: the networks a pipeline is made of and what its
/// denoiser is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// SD 1.x/2.x (LCM-distilled and inpainting UNets included).
    Sd,
    /// SDXL, base and refiner.
    Sdxl,
    /// FLUX.1 (dev, schnell): CLIP-L and T5 text encoders, the Flux
    /// transformer (flow matching), a 16-channel VAE.
    Flux,
    /// FLUX.2 Klein: a Qwen3 text encoder, the FLUX.2 transformer on
    /// patchified latents, the 32-channel FLUX.2 VAE.
    Klein,
    /// Z-Image: a Qwen3 text encoder, the single-stream Z-Image
    /// transformer, a 16-channel VAE.
    ZImage,
}

/// The pipeline classes served, by family: what `model_index.json`'s
/// `_class_name` may say.
const SERVED: [(&str, Family); 12] = [
    ("StableDiffusionPipeline", Family::Sd),
    ("StableDiffusionImg2ImgPipeline", Family::Sd),
    ("StableDiffusionInpaintPipeline", Family::Sd),
    ("LatentConsistencyModelPipeline", Family::Sd),
    ("LatentConsistencyModelImg2ImgPipeline", Family::Sd),
    ("StableDiffusionXLPipeline", Family::Sdxl),
    ("StableDiffusionXLImg2ImgPipeline", Family::Sdxl),
    ("StableDiffusionXLInpaintPipeline", Family::Sdxl),
    ("FluxPipeline", Family::Flux),
    ("FluxImg2ImgPipeline", Family::Flux),
    ("Flux2KleinPipeline", Family::Klein),
    ("ZImagePipeline", Family::ZImage),
];

/// A pipeline class sdserve does not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub class: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let served: Vec<&str> = SERVED.iter().map(|(c, _)| *c).collect();
        let c = &self.class;
        // A class name as it is; anything else quoted (and cut short).
        if c.len() <= 64 && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            write!(f, "{c}")?;
        } else {
            write!(f, "{}", crate::status::quote(c))?;
        }
        write!(f, " is not supported (served: {})", served.join(", "))
    }
}

impl std::error::Error for Unsupported {}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Sd,
        Family::Sdxl,
        Family::Flux,
        Family::Klein,
        Family::ZImage,
    ];

    /// The family of a diffusers pipeline class (`_class_name`).
    pub fn of_pipeline_class(class: &str) -> Result<Family, Unsupported> {
        SERVED
            .iter()
            .find(|(c, _)| *c == class)
            .map(|(_, f)| *f)
            .ok_or_else(|| Unsupported {
                class: class.to_string(),
            })
    }

    /// The family of a model whose `model_index.json` reads `index` (its
    /// `_class_name`); None when the index names no class (a hand-made
    /// directory: the caller decides from the folders).
    pub fn of_model_index(index: &str) -> Result<Option<Family>, String> {
        let class = class_name(index)?;
        class
            .map(|c| Family::of_pipeline_class(&c).map_err(|e| e.to_string()))
            .transpose()
    }

    /// Its name in listings and logs: `sd`, `sdxl`.
    pub const fn name(self) -> &'static str {
        match self {
            Family::Sd => "sd",
            Family::Sdxl => "sdxl",
            Family::Flux => "flux",
            Family::Klein => "klein",
            Family::ZImage => "zimage",
        }
    }

    /// The family a set of published family parameters belongs to.
    pub fn of_params(params: &v1::denoiser_info::FamilyParams) -> Family {
        use v1::denoiser_info::FamilyParams;
        match params {
            FamilyParams::Sd(_) => Family::Sd,
            FamilyParams::Sdxl(_) => Family::Sdxl,
            FamilyParams::Flux(_) => Family::Flux,
            FamilyParams::Klein(_) => Family::Klein,
            FamilyParams::Zimage(_) => Family::ZImage,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Family> for v1::ModelFamily {
    fn from(f: Family) -> Self {
        match f {
            Family::Sd => v1::ModelFamily::Sd,
            Family::Sdxl => v1::ModelFamily::Sdxl,
            Family::Flux => v1::ModelFamily::Flux,
            Family::Klein => v1::ModelFamily::Klein,
            Family::ZImage => v1::ModelFamily::Zimage,
        }
    }
}

impl TryFrom<v1::ModelFamily> for Family {
    type Error = &'static str;

    fn try_from(f: v1::ModelFamily) -> Result<Self, Self::Error> {
        match f {
            v1::ModelFamily::Sd => Ok(Family::Sd),
            v1::ModelFamily::Sdxl => Ok(Family::Sdxl),
            v1::ModelFamily::Flux => Ok(Family::Flux),
            v1::ModelFamily::Klein => Ok(Family::Klein),
            v1::ModelFamily::Zimage => Ok(Family::ZImage),
            v1::ModelFamily::Unspecified => Err("no model family published"),
        }
    }
}

impl Family {
    /// The family a service published in its Info (`family` as sent).
    pub fn from_wire(value: i32) -> Result<Family, String> {
        let f = v1::ModelFamily::try_from(value)
            .map_err(|_| format!("an unknown model family ({value})"))?;
        Family::try_from(f).map_err(str::to_string)
    }
}

/// `_class_name` of a `model_index.json` (None where it says none).
fn class_name(index: &str) -> Result<Option<String>, String> {
    let index: serde_json::Value =
        serde_json::from_str(index).map_err(|e| format!("model_index.json: {e}"))?;
    match index.get("_class_name") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(c)) => Ok(Some(c.clone())),
        Some(_) => Err("model_index.json: `_class_name` is not a string".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn served_classes_name_their_family_and_others_are_refused_by_name() {
        assert_eq!(
            Family::of_pipeline_class("StableDiffusionXLImg2ImgPipeline"),
            Ok(Family::Sdxl)
        );
        assert_eq!(
            Family::of_pipeline_class("StableDiffusionPipeline"),
            Ok(Family::Sd)
        );
        let e = Family::of_pipeline_class("HiDreamImagePipeline")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "HiDreamImagePipeline is not supported (served: StableDiffusionPipeline, "
            ),
            "{e}"
        );
        assert!(e.contains("StableDiffusionXLPipeline"), "{e}");
        // SD3's directories have a text_encoder_2 too: refused by its
        // class, never taken for SDXL; FLUX's are FLUX.
        assert!(Family::of_pipeline_class("StableDiffusion3Pipeline").is_err());
        assert_eq!(Family::of_pipeline_class("FluxPipeline"), Ok(Family::Flux));
    }

    #[test]
    fn the_index_is_read_for_its_class() {
        let index = r#"{
  "_class_name": "StableDiffusionXLPipeline",
  "_diffusers_version": "0.36.0",
  "text_encoder": ["transformers", "CLIPTextModel"]
}"#;
        assert_eq!(Family::of_model_index(index), Ok(Some(Family::Sdxl)));
        assert_eq!(Family::of_model_index("{}"), Ok(None));
        assert_eq!(Family::of_model_index(r#"{"_class_name": null}"#), Ok(None));
        let e = Family::of_model_index(r#"{"_class_name":"FluxKontextPipeline"}"#).unwrap_err();
        assert!(e.starts_with("FluxKontextPipeline is not supported"), "{e}");
        assert!(Family::of_model_index(r#"{"_class_name": 3}"#).is_err());
    }

    #[test]
    fn the_wire_form_goes_both_ways_and_unspecified_is_refused() {
        for f in Family::ALL {
            let wire: v1::ModelFamily = f.into();
            assert_eq!(Family::from_wire(wire as i32), Ok(f));
        }
        assert!(Family::from_wire(0).is_err());
        assert!(Family::from_wire(99).is_err());
    }
}
