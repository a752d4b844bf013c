//! AUTOMATIC1111's extra-network tags: `<lora:NAME>` and
//! `<lora:NAME:MULTIPLIER>` in a prompt name a LoRA to apply (A1111's
//! `extra_networks.parse_prompt`: every `<word:args>` is taken out of the
//! prompt text, its args split on `:`).

/// A LoRA a prompt names, at its multiplier (1 when unsaid).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub scale: f32,
}

/// The prompt with its `<lora:…>` tags taken out, and the tags; an error
/// names what is not supported (other extra networks, separate text-encoder
/// and UNet multipliers, named arguments) or malformed.
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
    let parts: Vec<&str> = args.split(':').collect();
    if parts.iter().skip(1).any(|p| p.contains('=')) {
        return Err(format!(
            "<lora:{args}>: named multipliers (te=, unet=, dyn=) are not supported"
        ));
    }
    let name = parts[0].trim().to_string();
    let number = |s: &str| {
        s.trim()
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("<lora:{args}>: `{s}` is not a number"))
    };
    let scale = match parts.get(1) {
        Some(s) => number(s)?,
        None => 1.0,
    };
    if let Some(unet) = parts.get(2) {
        if (number(unet)? - scale).abs() > f32::EPSILON || parts.len() > 3 {
            return Err(format!(
                "<lora:{args}>: separate text-encoder and UNet multipliers are not supported"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("<lora:{args}>: no name"));
    }
    Ok(LoraTag { name, scale })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, scale: f32) -> LoraTag {
        LoraTag {
            name: name.into(),
            scale,
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
        assert!(take_loras("<lora:x:0.5:1>")
            .unwrap_err()
            .contains("separate"));
        assert!(take_loras("<lora:x:te=1>").unwrap_err().contains("named"));
        assert!(take_loras("<lora:x:big>")
            .unwrap_err()
            .contains("not a number"));
    }
}
