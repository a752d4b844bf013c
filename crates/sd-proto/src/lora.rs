//! The checks of a request's LoRA list that need no file (count, names,
//! duplicates, scales): the gateway makes them before any work, and the
//! services again on what reaches them.

use std::collections::HashSet;

use crate::v1::LoraRef;

/// At most this many adapters per request.
pub const MAX_LORAS: usize = 8;
/// Scales outside ±this are refused (a typo, not a style).
pub const MAX_SCALE: f32 = 10.0;

/// The field at fault (`loras`, `loras[i].name`, `loras[i].scale`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

pub fn check(refs: &[LoraRef]) -> Result<(), Invalid> {
    let invalid = |field: String, message: String| Err(Invalid { field, message });
    if refs.len() > MAX_LORAS {
        return invalid(
            "loras".into(),
            format!("{} given, at most {MAX_LORAS}", refs.len()),
        );
    }
    let mut seen = HashSet::new();
    for (i, r) in refs.iter().enumerate() {
        let n = &r.name;
        if n.is_empty()
            || n.len() > 128
            || n.starts_with('.')
            || n.contains(['/', '\\', ':', '<', '>'])
            || n.chars().any(char::is_control)
        {
            return invalid(
                format!("loras[{i}].name"),
                format!(
                    "`{}` is not a LoRA name (a file name without .safetensors, and \
                     without `:`, `<` or `>`, which a prompt tag cannot carry)",
                    n.escape_debug()
                ),
            );
        }
        if !seen.insert(n.as_str()) {
            return invalid(format!("loras[{i}].name"), format!("`{n}` is named twice"));
        }
        for (field, v) in [("scale", Some(r.scale)), ("unet_scale", r.unet_scale)] {
            match v {
                Some(v) if !v.is_finite() || v.abs() > MAX_SCALE => {
                    return invalid(
                        format!("loras[{i}].{field}"),
                        format!("{v} given, -{MAX_SCALE}..={MAX_SCALE} allowed"),
                    )
                }
                _ => {}
            }
        }
    }
    Ok(())
}

impl LoraRef {
    /// Its multiplier on the text encoder.
    pub fn for_text_encoder(&self) -> f32 {
        self.scale
    }

    /// Its multiplier on the UNet: `unet_scale`, else `scale`.
    pub fn for_unet(&self) -> f32 {
        self.unet_scale.unwrap_or(self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, scale: f32, unet_scale: Option<f32>) -> Result<(), Invalid> {
        check(&[LoraRef {
            name: name.into(),
            scale,
            unet_scale,
        }])
    }

    #[test]
    fn names_a_prompt_tag_can_carry_and_finite_scales_in_range() {
        assert!(one("style_v2-final.1", 0.8, Some(-2.0)).is_ok());
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a\\b",
            "v1:style",
            "a<b",
            "a>b",
            "tab\tname",
        ] {
            let e = one(bad, 1.0, None).unwrap_err();
            assert_eq!(e.field, "loras[0].name", "{bad}");
        }
        let e = one("s", f32::NAN, None).unwrap_err();
        assert_eq!(e.field, "loras[0].scale");
        let e = one("s", 1.0, Some(10.5)).unwrap_err();
        assert_eq!(e.field, "loras[0].unet_scale");
        let twice = [
            LoraRef {
                name: "s".into(),
                scale: 1.0,
                unet_scale: None,
            },
            LoraRef {
                name: "s".into(),
                scale: 0.5,
                unet_scale: None,
            },
        ];
        assert_eq!(check(&twice).unwrap_err().field, "loras[1].name");
    }
}
