//! AUTOMATIC1111's prompt attention syntax (`modules/prompt_parser.py`,
//! `parse_prompt_attention`, 1.10): `(x)` multiplies x's weight by 1.1,
//! `[x]` divides it by 1.1, `(x:w)` multiplies it by w; nesting multiplies
//! (in f64, so `((x))` is 1.2100000000000002); a bracket left open runs to
//! the end; a stray `)`, `]` or `:` is text; `\(`, `\)`, `\[`, `\]` and `\\`
//! are the characters themselves (a backslash before anything else
//! vanishes, as in A1111); `BREAK` as a word ends a chunk; adjacent
//! fragments of the same weight merge. As 1.10 has it, spaces may stand
//! around a weight: `(x : 1.5 )`.

/// One piece of a prompt and its weight; `BREAK` is a fragment of its own
/// with weight -1, as A1111 marks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    pub text: String,
    pub weight: f64,
}

impl Fragment {
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

const ROUND_UP: f64 = 1.1;
const SQUARE_DOWN: f64 = 1.0 / 1.1;

/// A token of A1111's `re_attention` scan.
#[derive(Debug, PartialEq)]
enum Tok<'a> {
    /// `\(` and the like: the character itself.
    Escaped(&'a str),
    Open(char),
    Close(char),
    /// `:1.5)`: a weight closing a round bracket (the match, for when no
    /// round bracket is open and it is text).
    Weight(f64, &'a str),
    Text(&'a str),
}

/// A1111's `re_attention`, one match at a time.
fn scan(s: &str) -> Vec<Tok<'_>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && i + 1 < b.len() && matches!(b[i + 1], b'(' | b')' | b'[' | b']' | b'\\') {
            out.push(Tok::Escaped(&s[i + 1..i + 2]));
            i += 2;
        } else if c == b'\\' {
            // A backslash before anything else: A1111 keeps what follows the
            // backslash in its match, which is nothing.
            out.push(Tok::Escaped(""));
            i += 1;
        } else if c == b'(' || c == b'[' {
            out.push(Tok::Open(c as char));
            i += 1;
        } else if c == b':' {
            match weight_at(s, i) {
                Some((w, len)) => {
                    out.push(Tok::Weight(w, &s[i..i + len]));
                    i += len;
                }
                None => {
                    out.push(Tok::Text(&s[i..i + 1]));
                    i += 1;
                }
            }
        } else if c == b')' || c == b']' {
            out.push(Tok::Close(c as char));
            i += 1;
        } else {
            let end = next_special(b, i + 1);
            out.push(Tok::Text(&s[i..end]));
            i = end;
        }
    }
    out
}

/// Where the text run from `from` ends: at the next `\ ( ) [ ] :`.
fn next_special(b: &[u8], from: usize) -> usize {
    (from..b.len())
        .find(|&j| matches!(b[j], b'\\' | b'(' | b')' | b'[' | b']' | b':'))
        .unwrap_or(b.len())
}

/// `:\s*([+-]?[.\d]+)\s*\)` at `i`: the weight and the match's length.
fn weight_at(s: &str, i: usize) -> Option<(f64, usize)> {
    let rest = &s[i + 1..];
    let trimmed = rest.trim_start();
    let lead = rest.len() - trimmed.len();
    let sign = trimmed.starts_with(['+', '-']) as usize;
    let digits = trimmed[sign..]
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len() - sign);
    if digits == 0 {
        return None;
    }
    let number = &trimmed[..sign + digits];
    let after = &trimmed[sign + digits..];
    let after_trim = after.trim_start();
    if !after_trim.starts_with(')') {
        return None;
    }
    // Python's float() of the match; "1.2.3" or "." does not parse: A1111
    // would raise, here the text stays text.
    let w: f64 = number.parse().ok()?;
    let len = 1 + lead + sign + digits + (after.len() - after_trim.len()) + 1;
    Some((w, len))
}

/// A1111's `parse_prompt_attention`.
pub fn parse(text: &str) -> Vec<Fragment> {
    let mut res: Vec<Fragment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Fragment>, from: usize, m: f64| {
        for f in &mut res[from..] {
            f.weight *= m;
        }
    };
    for tok in scan(text) {
        match tok {
            Tok::Escaped(c) => res.push(Fragment {
                text: c.to_string(),
                weight: 1.0,
            }),
            Tok::Open('(') => round.push(res.len()),
            Tok::Open(_) => square.push(res.len()),
            Tok::Weight(w, _) if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Tok::Weight(_, text) => push_text(&mut res, text),
            Tok::Close(')') if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND_UP);
            }
            Tok::Close(']') if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, SQUARE_DOWN);
            }
            Tok::Close(c) => res.push(Fragment {
                text: c.to_string(),
                weight: 1.0,
            }),
            Tok::Text(t) => push_text(&mut res, t),
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND_UP);
    }
    for from in square {
        multiply(&mut res, from, SQUARE_DOWN);
    }
    if res.is_empty() {
        res.push(Fragment {
            text: String::new(),
            weight: 1.0,
        });
    }
    merge(res)
}

/// Text, split at `BREAK` words (A1111's `re.split(r"\s*\bBREAK\b\s*", …)`).
fn push_text(res: &mut Vec<Fragment>, t: &str) {
    let parts = split_break(t);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            res.push(Fragment {
                text: "BREAK".into(),
                weight: -1.0,
            });
        }
        res.push(Fragment {
            text: part.to_string(),
            weight: 1.0,
        });
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\s*\bBREAK\b\s*", t)`.
fn split_break(t: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(k) = t[search..].find("BREAK").map(|k| k + search) {
        let before_ok = t[..k].chars().next_back().is_none_or(|c| !is_word(c));
        let after = k + "BREAK".len();
        let after_ok = t[after..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            let left = t[start..k].trim_end();
            parts.push(left);
            let rest = &t[after..];
            start = after + (rest.len() - rest.trim_start().len());
            search = start.max(after);
        } else {
            search = k + 1;
        }
    }
    parts.push(&t[start..]);
    parts
}

/// Adjacent fragments of equal weight merge (A1111 compares floats exactly).
fn merge(mut res: Vec<Fragment>) -> Vec<Fragment> {
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].weight == res[i + 1].weight {
            let next = res.remove(i + 1);
            res[i].text.push_str(&next.text);
        } else {
            i += 1;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<(String, f64)> {
        parse(s).into_iter().map(|f| (f.text, f.weight)).collect()
    }

    fn v(items: &[(&str, f64)]) -> Vec<(String, f64)> {
        items.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    /// The examples in A1111's own docstring of `parse_prompt_attention`.
    #[test]
    fn a1111_docstring_examples() {
        assert_eq!(p("normal text"), v(&[("normal text", 1.0)]));
        assert_eq!(
            p("an (important) word"),
            v(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(p("(unbalanced"), v(&[("unbalanced", 1.1)]));
        assert_eq!(p("\\(literal\\]"), v(&[("(literal]", 1.0)]));
        assert_eq!(p("(unnecessary)(parens)"), v(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            v(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn weights_nesting_and_strays() {
        assert_eq!(p("((x))"), v(&[("x", 1.2100000000000002)]));
        assert_eq!(p("[x]"), v(&[("x", 1.0 / 1.1)]));
        // The space before the colon is the text's own.
        assert_eq!(p("(x : 1.5 )"), v(&[("x ", 1.5)]));
        assert_eq!(p("a) b] c: d"), v(&[("a) b] c: d", 1.0)]));
        assert_eq!(p("\\\\"), v(&[("\\", 1.0)]));
        // A lone backslash vanishes; a weight with no bracket open is text.
        assert_eq!(p("a\\b"), v(&[("ab", 1.0)]));
        assert_eq!(p("x:1.5) y"), v(&[("x:1.5) y", 1.0)]));
        assert_eq!(p(""), v(&[("", 1.0)]));
    }

    #[test]
    fn break_is_its_own_fragment() {
        assert_eq!(
            p("a cat BREAK a dog"),
            v(&[("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)])
        );
        // Only as a word.
        assert_eq!(p("BREAKFAST"), v(&[("BREAKFAST", 1.0)]));
        assert!(parse("x BREAK y")[1].is_break());
    }
}

/// Why a prompt cannot be read without A1111's attention weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Emphasis {
    Break,
    Weighted { text: String, weight: f64 },
}

impl std::fmt::Display for Emphasis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Emphasis::Break => {
                f.write_str("BREAK is not read here (the encoder takes one sequence)")
            }
            Emphasis::Weighted { text, weight } => {
                // The client's text, quoted and cut short.
                let mut end = text.len().min(64);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                write!(
                    f,
                    "attention weights are not applied here: {:?} has weight {weight}; remove \
                     the (…:w) / […] syntax or escape the brackets",
                    &text[..end]
                )
            }
        }
    }
}

/// A prompt in A1111's syntax read as plain text, for an encoder where
/// attention weights have no meaning here (FLUX's T5): escapes resolved,
/// fragments joined; a weight other than 1 or `BREAK` is an error.
pub fn unweighted(text: &str) -> Result<String, Emphasis> {
    let mut out = String::new();
    for f in parse(text) {
        if f.is_break() {
            return Err(Emphasis::Break);
        }
        if (f.weight - 1.0).abs() > 1e-6 {
            return Err(Emphasis::Weighted {
                text: f.text.trim().to_string(),
                weight: f.weight,
            });
        }
        out.push_str(&f.text);
    }
    Ok(out)
}

/// What A1111 reads in a prompt that this implementation does not do —
/// composable diffusion (`AND`, a trailing `:N` weight), prompt editing and
/// alternation (`[a:b:N]`, `[a:N]`, `[a|b]`), hypernetworks — named, so the
/// request is refused rather than drawn without it.
pub fn unsupported(text: &str) -> Option<&'static str> {
    if text.contains("<hypernet:") {
        return Some("hypernetwork tags (<hypernet:…>) are not supported");
    }
    let words_and = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| w == "AND");
    if words_and {
        return Some("AND (composable diffusion) is not supported");
    }
    let b = text.as_bytes();
    let (mut square, mut round) = (0usize, 0usize);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' => square += 1,
            b']' => square = square.saturating_sub(1),
            b'(' => round += 1,
            b')' => round = round.saturating_sub(1),
            b':' | b'|' if square > round => {
                return Some("prompt editing and alternation ([a:b:N], [a|b]) are not supported");
            }
            _ => {}
        }
        i += 1;
    }
    let trimmed = text.trim_end();
    if let Some((head, tail)) = trimmed.rsplit_once(':') {
        let weight_like = !tail.trim().is_empty() && tail.trim().parse::<f64>().is_ok();
        if weight_like && !head.ends_with('\\') && round == 0 && !trimmed.ends_with(')') {
            return Some(
                "a weight on the whole prompt (`prompt:N`, composable diffusion) is not supported",
            );
        }
    }
    None
}

#[cfg(test)]
mod unsupported_tests {
    use super::{unsupported, unweighted, Emphasis};

    #[test]
    fn what_a1111_does_and_this_does_not_is_named() {
        for ok in [
            "a (red:1.2) cube",
            "a [dim] light",
            "\\[a:b\\]",
            "ratio 16:9 poster",
            "(x:1.1), y",
        ] {
            assert_eq!(unsupported(ok), None, "{ok}");
        }
        for bad in [
            "a cat AND a dog",
            "a [cat:dog:0.5] sitting",
            "[cat:0.3] x",
            "a [cat|dog]",
            "a cat:1.2",
            "<hypernet:style:0.8> a cat",
        ] {
            assert!(unsupported(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn unweighted_reads_plain_text_and_refuses_weights() {
        assert_eq!(
            unweighted(r"a \(cat\) on a mat").unwrap(),
            "a (cat) on a mat"
        );
        assert_eq!(
            unweighted("a (cat:1.3)"),
            Err(Emphasis::Weighted {
                text: "cat".into(),
                weight: 1.3
            })
        );
        assert_eq!(unweighted("a BREAK b"), Err(Emphasis::Break));
        assert!(unweighted("[dim]").is_err());
    }
}
