//! Textual-inversion embeddings (`--embeddings-dir`): `NAME.safetensors`
//! files as AUTOMATIC1111 and diffusers write them — `emb_params` (kohya,
//! A1111's safetensors), `string_to_param.*` (A1111's layout), one tensor
//! under any key (diffusers' `learned_embeds`), `clip_l` + `clip_g`
//! (SDXL) — each standing for a word: the file's stem. A prompt word
//! equal to it is replaced by its vectors in place of its tokens' input
//! embeddings (A1111's exact token-sequence match, the longest name first;
//! diffusers' `load_textual_inversion(path, token=NAME)` gives the same).
//! Pickles (`.pt`, `.bin`) are listed as skipped, never loaded.

use std::path::Path;

use sd_models::Fix;
use sd_prompt::chunks::{placeholder, placeholder_parts, CHUNK_LENGTH};
use sd_proto::v1::TextualInversion;
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::text::{Encoder, TextEncoders};
use crate::ServiceError;

/// One embedding as one encoder takes it.
pub struct Inversion {
    /// Its index in the listing (the same for every encoder).
    pub index: usize,
    pub name: String,
    /// The name as this encoder's tokenizer reads it.
    pub tokens: Vec<i64>,
    /// (vectors, width of this encoder's token embeddings).
    pub vectors: Tensor,
}

// SAFETY: the vectors are written once, at load, and only read afterwards
// (a fix takes a view of a row); libtorch allows concurrent reads of a
// tensor from several threads.
unsafe impl Sync for Inversion {}

/// A file's vectors: one tensor, or SDXL's two by encoder.
enum Vectors {
    One(Tensor),
    Xl { l: Tensor, g: Tensor },
}

/// The vectors in a safetensors file, by A1111's and diffusers' layouts.
fn read_vectors(path: &Path) -> Result<Vectors, String> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| format!("unreadable: {e}"))?;
    let get = |k: &str| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t);
    let rows = |t: &Tensor| -> Result<Tensor, String> {
        let t = t.to_kind(tch::Kind::Float);
        match t.dim() {
            1 => Ok(t.unsqueeze(0)),
            2 => Ok(t),
            _ => Err(format!(
                "a tensor of shape {:?}, expected (vectors, width)",
                t.size()
            )),
        }
    };
    if let (Some(l), Some(g)) = (get("clip_l"), get("clip_g")) {
        let (l, g) = (rows(l)?, rows(g)?);
        if l.size()[0] != g.size()[0] {
            return Err(format!(
                "clip_l has {} vectors, clip_g {}",
                l.size()[0],
                g.size()[0]
            ));
        }
        return Ok(Vectors::Xl { l, g });
    }
    if let Some(t) = get("emb_params") {
        return Ok(Vectors::One(rows(t)?));
    }
    let params: Vec<&Tensor> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with("string_to_param."))
        .map(|(_, t)| t)
        .collect();
    if params.len() == 1 {
        return Ok(Vectors::One(rows(params[0])?));
    }
    if tensors.len() == 1 {
        return Ok(Vectors::One(rows(&tensors[0].1)?));
    }
    Err(format!(
        "neither emb_params, string_to_param, clip_l with clip_g, nor one tensor ({} tensors)",
        tensors.len()
    ))
}

/// SHA-256 of `bytes`, hex.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TextEncoders {
    /// Load the embeddings in `dir` (its files, not its subfolders, in name
    /// order) for these encoders; the listing, loaded and skipped.
    pub fn load_embeddings(&mut self, dir: &Path) -> anyhow::Result<Vec<TextualInversion>> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("--embeddings-dir {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut listed = Vec::new();
        for path in files {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            let Some(name) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if !["safetensors", "pt", "bin"].contains(&ext.as_str()) {
                continue;
            }
            let bytes = std::fs::read(&path)?;
            let mut entry = TextualInversion {
                name: name.clone(),
                sha256: digest(&bytes),
                ..Default::default()
            };
            let result = if ext == "safetensors" {
                read_vectors(&path).and_then(|v| self.fit(listed.len(), &name, v, &mut entry))
            } else {
                Err("a pickle: not loaded (convert it to .safetensors)".into())
            };
            if let Err(why) = result {
                tracing::warn!(embedding = %name, %why, "textual-inversion embedding skipped");
                entry.skipped = why;
            }
            listed.push(entry);
        }
        for e in self.encoders_mut() {
            // The longest name first, as A1111 matches them.
            e.inversions
                .sort_by_key(|i| std::cmp::Reverse(i.tokens.len()));
        }
        Ok(listed)
    }

    /// Give each encoder its part of embedding `index` (`entry` gets its
    /// vector count and width), or say why it does not fit this model.
    fn fit(
        &mut self,
        index: usize,
        name: &str,
        v: Vectors,
        entry: &mut TextualInversion,
    ) -> Result<(), String> {
        let parts: Vec<(&mut Encoder, Tensor)> = match (self, v) {
            (TextEncoders::Single(e), Vectors::One(t)) => vec![(e.as_mut(), t)],
            (TextEncoders::Xl { first, second }, Vectors::Xl { l, g }) => {
                let mut parts = vec![(second.as_mut(), g)];
                if let Some(f) = first {
                    parts.insert(0, (f.as_mut(), l));
                }
                parts
            }
            (TextEncoders::Xl { .. }, Vectors::One(_)) => {
                return Err("one set of vectors: an SDXL model needs clip_l and clip_g".into())
            }
            (TextEncoders::Single(_), Vectors::Xl { .. }) => {
                return Err("clip_l and clip_g: made for an SDXL model".into())
            }
            (TextEncoders::Flux { .. }, _) => {
                return Err("FLUX reads prompts with T5: textual inversion does not apply".into())
            }
            (TextEncoders::Qwen(_), _) => {
                return Err(
                    "this model reads prompts with Qwen3: textual inversion does not apply".into(),
                )
            }
        };
        let mut checked = Vec::new();
        let (mut vectors, mut shape) = (0, 0);
        for (e, t) in parts {
            let width = e.clip.hidden_size();
            let (n, w) = (t.size()[0], t.size()[1]);
            if w != width {
                return Err(format!(
                    "vectors of width {w}, this model's text encoder takes {width}"
                ));
            }
            if n < 1 || n as usize > CHUNK_LENGTH {
                return Err(format!("{n} vectors, 1..={CHUNK_LENGTH} allowed"));
            }
            let tokens = e
                .tokenizer
                .encode_words(name)
                .map_err(|err| format!("the name: {err}"))?;
            if tokens.is_empty() {
                return Err("the name reads as no token".into());
            }
            (vectors, shape) = (n as u32, shape + w as u32);
            checked.push((e, tokens, t));
        }
        for (e, tokens, vectors) in checked {
            e.inversions.push(Inversion {
                index,
                name: name.to_string(),
                tokens,
                vectors,
            });
        }
        entry.vectors = vectors;
        entry.shape = shape;
        Ok(())
    }

    fn encoders_mut(&mut self) -> Vec<&mut Encoder> {
        match self {
            TextEncoders::Single(e) => vec![e.as_mut()],
            TextEncoders::Xl { first, second } => {
                let mut v: Vec<&mut Encoder> = Vec::new();
                if let Some(f) = first {
                    v.push(f.as_mut());
                }
                v.push(second.as_mut());
                v
            }
            TextEncoders::Flux { clip, .. } => vec![clip.as_mut()],
            TextEncoders::Qwen(_) => Vec::new(),
        }
    }

    /// The embeddings `prompt` uses (their names, in order of first use):
    /// plainly read, or each of its A1111 fragments.
    pub fn inversions_in(&self, prompt: &str, a1111: bool) -> Result<Vec<String>, ServiceError> {
        let Some(e) = self.encoders().into_iter().next() else {
            return Ok(Vec::new());
        };
        if e.inversions.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<String> = if a1111 {
            sd_prompt::parse(prompt)
                .into_iter()
                .filter(|f| !f.is_break())
                .map(|f| f.text)
                .collect()
        } else {
            vec![prompt.to_string()]
        };
        let mut names: Vec<String> = Vec::new();
        for t in texts {
            let words = e
                .tokenizer
                .encode_words(&t)
                .map_err(|err| ServiceError::model_input("prompts", err))?;
            for index in splice(&words, &e.inversions).1 {
                let name = &e
                    .inversions
                    .iter()
                    .find(|i| i.index == index)
                    .map(|i| i.name.clone());
                if let Some(n) = name {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
        }
        Ok(names)
    }
}

/// `words` with each embedding name's tokens replaced by its vectors'
/// placeholders (the longest name first at each position), and the
/// embeddings used.
pub fn splice(words: &[i64], inversions: &[Inversion]) -> (Vec<i64>, Vec<usize>) {
    let mut out = Vec::with_capacity(words.len());
    let mut used = Vec::new();
    let mut p = 0;
    while p < words.len() {
        match inversions
            .iter()
            .find(|i| words[p..].starts_with(&i.tokens))
        {
            Some(i) => {
                let n = i.vectors.size()[0] as usize;
                out.extend((0..n).map(|j| placeholder(i.index, j)));
                used.push(i.index);
                p += i.tokens.len();
            }
            None => {
                out.push(words[p]);
                p += 1;
            }
        }
    }
    (out, used)
}

/// The fixes for the placeholders in `rows` (token ids, one row per
/// sequence), each placeholder replaced by token 0 (its embedding is
/// overwritten; A1111's stand-in). `ranked`: diffusers' reading, where the
/// vectors are tokens added past the vocabulary in load order (which the
/// pooled output's legacy end-of-text search sees).
pub fn fixes(rows: &mut [Vec<i64>], inversions: &[Inversion], ranked: bool) -> Vec<Fix> {
    let mut out = Vec::new();
    for (r, ids) in rows.iter_mut().enumerate() {
        for (p, id) in ids.iter_mut().enumerate() {
            let Some((index, j)) = placeholder_parts(*id) else {
                continue;
            };
            if let Some(i) = inversions.iter().find(|i| i.index == index) {
                out.push(Fix {
                    row: r as i64,
                    position: p as i64,
                    vector: i.vectors.get(j as i64),
                    rank: ranked.then(|| rank(inversions, index, j)),
                });
            }
            *id = 0;
        }
    }
    out
}

/// Where vector `j` of embedding `index` ranks among the tokens diffusers
/// adds when the embeddings are loaded in name order (each adds one token
/// a vector).
fn rank(inversions: &[Inversion], index: usize, j: usize) -> i64 {
    let before: i64 = inversions
        .iter()
        .filter(|i| i.index < index)
        .map(|i| i.vectors.size()[0])
        .sum();
    before + j as i64
}

/// diffusers' reading of `prompt` with the embeddings' tokens in place:
/// start, at most `max − 2` tokens, end, padding; None when it uses no
/// embedding (the tokenizer's own encoding is the same then).
pub fn plain_ids(e: &Encoder, prompt: &str) -> Result<Option<Vec<i64>>, ServiceError> {
    if e.inversions.is_empty() {
        return Ok(None);
    }
    let words = e
        .tokenizer
        .encode_words(prompt)
        .map_err(|err| ServiceError::model_input("prompts", err))?;
    let (spliced, used) = splice(&words, &e.inversions);
    if used.is_empty() {
        return Ok(None);
    }
    let vocab = e
        .tokenizer
        .vocab()
        .map_err(|err| ServiceError::model_input("prompts", err))?;
    let max = e.tokenizer.max_length();
    let mut ids = Vec::with_capacity(max);
    ids.push(vocab.bos);
    ids.extend(spliced.iter().take(max - 2));
    ids.push(vocab.eos);
    ids.resize(max, vocab.pad);
    Ok(Some(ids))
}
