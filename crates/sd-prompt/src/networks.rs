//! AUTOMATIC1111's extra-network tags: `<lora:NAME>`,
//! `<lora:NAME:MULTIPLIER>` and `<lora:NAME:TE:UNET>` (or `te=`/`unet=`)
//! in a prompt name a LoRA to apply (A1111's `extra_networks.parse_prompt`:
//! every `<word:args>` is taken out of the prompt text, its args split on
//! `:`, those with one `=` named, the rest positional; the Lora extension
//! reads the text encoder's multiplier from the second, 1 when unsaid, and
//! the UNet's from the third, the text encoder's when unsaid).

/// A LoRA a prompt names, at its multipliers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    /// On the text encoder (and on the UNet unless `unet` is given).
    pub scale: f32,
    /// On the UNet, where the tag gives it apart.
    pub unet: Option<f32>,
}

/// The prompt with its `<lora:…>` tags taken out, and the tags; an error
/// names what is not supported (other extra networks, dynamic rank) or
/// malformed.
pub fn take_loras(prompt: &str) -> Result<(String, Vec<LoraTag>), String> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        // A1111's pattern: `<(\w+):([^>]+)>`
        let kind_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let kind = &after[..kind_len];
        let tail = &after[kind_len..];
        let close = tail.find('>');
        let args = match (kind.is_empty(), tail.strip_prefix(':'), close) {
            (false, Some(t), Some(c)) if c > 1 && !t[..c - 1].is_empty() => &t[..c - 1],
            _ => {
                // not a tag: kept as text
                text.push_str(&rest[..open + 1]);
                rest = after;
                continue;
            }
        };
        text.push_str(&rest[..open]);
        rest = &tail[close.unwrap_or(0) + 1..];
        match kind {
            "lora" | "lyco" => tags.push(lora(args)?),
            other => {
                return Err(format!(
                    "<{other}:…>: only LoRA extra networks (<lora:name:multiplier>) are supported"
                ))
            }
        }
    }
    text.push_str(rest);
    Ok((text, tags))
}

fn lora(args: &str) -> Result<LoraTag, String> {
    let mut positional = Vec::new();
    let (mut te, mut unet) = (None, None);
    for item in args.split(':') {
        match item.split_once('=') {
            // A1111 takes an item with exactly one `=` as named.
            Some((key, value)) if !value.contains('=') => match key {
                "te" => te = Some(value),
                "unet" => unet = Some(value),
                "dyn" => {
                    return Err(format!(
                        "<lora:{args}>: dynamic rank (dyn=) is not supported"
                    ))
                }
                other => {
                    return Err(format!(
                        "<lora:{args}>: `{other}=` is not a LoRA argument (te=, unet=)"
                    ))
                }
            },
            _ => positional.push(item),
        }
    }
    let number = |s: &str| {
        s.trim()
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("<lora:{args}>: `{s}` is not a number"))
    };
    if positional.len() > 3 {
        return Err(format!(
            "<lora:{args}>: dynamic rank (a fourth argument) is not supported"
        ));
    }
    let name = positional.first().map_or("", |n| n.trim()).to_string();
    if name.is_empty() {
        return Err(format!("<lora:{args}>: no name"));
    }
    let scale = match te.or(positional.get(1).copied()) {
        Some(s) => number(s)?,
        None => 1.0,
    };
    let unet = match unet.or(positional.get(2).copied()) {
        Some(s) => Some(number(s)?).filter(|&u| u != scale),
        None => None,
    };
    Ok(LoraTag { name, scale, unet })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, scale: f32) -> LoraTag {
        LoraTag {
            name: name.into(),
            scale,
            unet: None,
        }
    }

    fn split(name: &str, scale: f32, unet: f32) -> LoraTag {
        LoraTag {
            unet: Some(unet),
            ..tag(name, scale)
        }
    }

    #[test]
    fn tags_are_taken_out_with_their_multipliers() {
        assert_eq!(
            take_loras("a cat <lora:style:0.8>, <lora:ink> drawn").unwrap(),
            (
                "a cat ,  drawn".to_string(),
                vec![tag("style", 0.8), tag("ink", 1.0)]
            )
        );
        assert_eq!(
            take_loras("<lora:a_b-c.v2:-0.5>x").unwrap(),
            ("x".to_string(), vec![tag("a_b-c.v2", -0.5)])
        );
        // the same multiplier twice is one multiplier
        assert_eq!(
            take_loras("<lora:s:0.5:0.5>").unwrap().1,
            vec![tag("s", 0.5)]
        );
    }

    #[test]
    fn text_encoder_and_unet_multipliers_as_a1111_reads_them() {
        let one = |p: &str| take_loras(p).unwrap().1.remove(0);
        assert_eq!(one("<lora:s:0.8:0.3>"), split("s", 0.8, 0.3));
        assert_eq!(one("<lora:s:te=0.8:unet=0.3>"), split("s", 0.8, 0.3));
        // named win over positional; the UNet's defaults to the text encoder's
        assert_eq!(one("<lora:s:0.5:te=0.8>"), tag("s", 0.8));
        assert_eq!(one("<lora:s:0.5:0.2:unet=0.3>"), split("s", 0.5, 0.3));
        assert_eq!(one("<lora:s:unet=0>"), split("s", 1.0, 0.0));
        // te= replaces the second positional, which the UNet's then follows
        assert_eq!(one("<lora:s:te=0:1>"), tag("s", 0.0));
    }

    #[test]
    fn what_is_not_a_tag_stays_text() {
        for p in [
            "a < b",
            "<3 cats",
            "<:x>",
            "<lora:>",
            "(a:1.2) <b",
            "x <lora:y",
        ] {
            assert_eq!(take_loras(p).unwrap(), (p.to_string(), vec![]), "{p}");
        }
    }

    #[test]
    fn what_is_not_supported_is_named() {
        assert!(take_loras("<hypernet:x:1>")
            .unwrap_err()
            .contains("hypernet"));
        assert!(take_loras("<lora:x:0.5:1:8>")
            .unwrap_err()
            .contains("dynamic rank"));
        assert!(take_loras("<lora:x:dyn=8>")
            .unwrap_err()
            .contains("dynamic rank"));
        assert!(take_loras("<lora:x:lbw=1>").unwrap_err().contains("`lbw=`"));
        assert!(take_loras("<lora:x:te=big>")
            .unwrap_err()
            .contains("not a number"));
        assert!(take_loras("<lora:x:big>")
            .unwrap_err()
            .contains("not a number"));
    }
}
