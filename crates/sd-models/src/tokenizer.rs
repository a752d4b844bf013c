//! CLIP's tokenizer with the `tokenizers` crate, giving the ids transformers'
//! `CLIPTokenizer` gives: `tokenizer.json` when the model ships one,
//! otherwise the byte-level BPE built from `vocab.json` + `merges.txt` with
//! CLIP's normalisation (NFC, whitespace runs to one space, lower case), its
//! word split, `</w>` word ends, BOS/EOS around at most `max_length - 2`
//! tokens, and padding with the model's pad token.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{ModelError, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's word split (from its reference tokenizer), special tokens first.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt tokenizer padded and truncated to the text encoder's length.
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// The same, without special tokens, truncation or padding: the words
    /// of a prompt fragment (AUTOMATIC1111's syntax).
    words: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| tok_err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl ClipTokenizer {
    /// Load from a model's `tokenizer/` directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let lookup = |key: &str| {
            token_text(config.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_text(special.as_ref().and_then(|c| c.get(key))))
        };
        let pad_token = lookup("pad_token").unwrap_or_else(|| EOS.to_string());
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .filter(|&n| (2..=4096).contains(&n))
            .unwrap_or(77) as usize;

        let json = dir.join("tokenizer.json");
        let mut inner: Tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?
        } else {
            Self::build_bpe(dir)?
        };
        // transformers splits the text on every special token, the pad token
        // too: with SDXL's second tokenizer, a "!" in a prompt is the pad
        // token, not part of a word (`tokenizer.json` files list it already).
        inner
            .add_special_tokens([AddedToken::from(pad_token.clone(), true)])
            .map_err(|e| tok_err(dir, e))?;
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            tok_err(
                dir,
                format!("pad token `{pad_token}` is not in the vocabulary"),
            )
        })?;
        let mut words = inner.clone();
        words.with_truncation(None).map_err(|e| tok_err(dir, e))?;
        words.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tok_err(dir, e))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(ClipTokenizer {
            inner,
            words,
            max_length,
            pad_id,
        })
    }

    /// The CLIP pipeline over `vocab.json` + `merges.txt`, as SD 1.x ships it.
    fn build_bpe(dir: &Path) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for p in [&vocab, &merges] {
            if !p.exists() {
                return Err(ModelError::MissingFile { path: p.clone() });
            }
        }
        let path_str = |p: &PathBuf| p.to_string_lossy().into_owned();
        let bpe = BPE::from_file(&path_str(&vocab), &path_str(&merges))
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(EOS.to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err(&vocab, e))?;
        let mut tok = Tokenizer::new(bpe);
        let normalizer = NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| tok_err(dir, e))?
            .into(),
            Lowercase.into(),
        ]);
        tok.with_normalizer(Some(normalizer))
            .map_err(|e| tok_err(dir, e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(dir, e))?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tok.with_decoder(Some(ByteLevel::default()));
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| tok_err(&vocab, format!("`{t}` is not in the vocabulary")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        tok.with_post_processor(Some(
            RobertaProcessing::new((EOS.to_string(), eos), (BOS.to_string(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tok.add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| tok_err(dir, e))?;
        Ok(tok)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The start, end and pad tokens and `,</w>`, for chunking prompts.
    pub fn vocab(&self) -> Result<sd_prompt::Vocab> {
        let id = |t: &str| {
            self.inner
                .token_to_id(t)
                .map(i64::from)
                .ok_or_else(|| ModelError::Input(format!("the tokenizer has no `{t}` token")))
        };
        Ok(sd_prompt::Vocab {
            bos: id(BOS)?,
            eos: id(EOS)?,
            pad: i64::from(self.pad_id),
            comma: self.inner.token_to_id(",</w>").map(i64::from),
        })
    }

    /// A fragment's token ids: no start or end token, no truncation, no
    /// padding (transformers' `add_special_tokens=False, truncation=False`).
    pub fn encode_words(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .words
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Token ids for one prompt: BOS, at most `max_length - 2` tokens, EOS, padding.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| ModelError::Input(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Ids for several prompts as a (batch, max_length) int64 tensor.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<tch::Tensor> {
        let mut flat = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            flat.extend(self.encode(p)?);
        }
        Ok(tch::Tensor::from_slice(&flat).view([prompts.len() as i64, self.max_length as i64]))
    }
}

/// T5's tokenizer (FLUX's `tokenizer_2/`) from the model's own
/// `tokenizer.json`: the prompt's tokens cut to `length − 1`, `</s>`, then
/// `<pad>` to `length` — transformers' `padding="max_length",
/// truncation=True` with T5's `$A </s>` template.
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    /// The model's `model_max_length` (512 for FLUX's).
    max_length: usize,
}

impl T5Tokenizer {
    /// Load from a model's `tokenizer_2/` directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let spm = dir.join("spiece.model");
            return Err(if spm.is_file() {
                tok_err(
                    &spm,
                    "a SentencePiece model alone is not read: the T5 tokenizer needs its \
                     tokenizer.json (as the FLUX repositories publish it)",
                )
            } else {
                ModelError::MissingFile { path }
            });
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        // Cut and padded here, whatever the file sets.
        inner.with_truncation(None).map_err(|e| tok_err(&path, e))?;
        inner.with_padding(None);
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special = |key: &str, default: &str| {
            token_text(config.as_ref().and_then(|c| c.get(key))).unwrap_or(default.to_string())
        };
        let id = |t: String| {
            inner
                .token_to_id(&t)
                .ok_or_else(|| tok_err(&path, format!("the tokenizer has no `{t}` token")))
        };
        let eos_id = id(special("eos_token", "</s>"))?;
        let pad_id = id(special("pad_token", "<pad>"))?;
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .filter(|&n| n >= 1)
            .unwrap_or(512)
            // FLUX's pipelines take at most 512 T5 tokens.
            .min(512) as usize;
        Ok(T5Tokenizer {
            inner,
            eos_id,
            pad_id,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// One prompt's ids at `length` tokens (at least 1: `</s>`).
    pub fn encode(&self, prompt: &str, length: usize) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| ModelError::Input(format!("tokenizing the prompt: {e}")))?;
        let keep = length.saturating_sub(1);
        let mut ids: Vec<i64> = enc.get_ids().iter().take(keep).map(|&i| i as i64).collect();
        if length > 0 {
            ids.push(self.eos_id as i64);
        }
        ids.resize(length, self.pad_id as i64);
        Ok(ids)
    }

    /// How many tokens `prompt` takes, `</s>` included (to say what a
    /// `length` cuts off).
    pub fn count(&self, prompt: &str) -> Result<usize> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| ModelError::Input(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().len() + 1)
    }

    /// Ids for several prompts as a (batch, length) int64 tensor.
    pub fn encode_batch(&self, prompts: &[&str], length: usize) -> Result<tch::Tensor> {
        let mut flat = Vec::with_capacity(prompts.len() * length);
        for p in prompts {
            flat.extend(self.encode(p, length)?);
        }
        Ok(tch::Tensor::from_slice(&flat).view([prompts.len() as i64, length as i64]))
    }
}

/// Qwen's tokenizer (FLUX.2 Klein's and Z-Image's `tokenizer/`) with the
/// model's chat template: a prompt becomes one user turn with the
/// assistant's turn opened (`apply_chat_template(…,
/// add_generation_prompt=True, enable_thinking=…)`), tokenized with the
/// added tokens, cut to a length and padded after it with the pad token —
/// transformers' `padding="max_length", truncation=True` (right side).
pub struct QwenTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    /// The chat template, compiled once (as `chat`).
    chat: minijinja::Environment<'static>,
}

impl QwenTokenizer {
    /// Load from a model's `tokenizer/` directory: `tokenizer.json`, and
    /// the chat template from `chat_template.jinja` or
    /// `tokenizer_config.json`'s `chat_template`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        inner.with_truncation(None).map_err(|e| tok_err(&path, e))?;
        inner.with_padding(None);
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?;
        if let Some(side) = config
            .as_ref()
            .and_then(|c| c.get("padding_side"))
            .and_then(Value::as_str)
            .filter(|s| *s != "right")
        {
            return Err(tok_err(
                &config_path,
                format!("padding_side `{side}`: the pipelines' Qwen tokenizers pad on the right"),
            ));
        }
        let pad = token_text(config.as_ref().and_then(|c| c.get("pad_token")))
            .unwrap_or_else(|| "<|endoftext|>".to_string());
        let pad_id = inner
            .token_to_id(&pad)
            .ok_or_else(|| tok_err(&path, format!("the tokenizer has no `{pad}` token")))?;
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io {
                path: jinja.clone(),
                source,
            })?
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: the default one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| tok_err(&config_path, "no `default` chat template"))?,
                _ => {
                    return Err(tok_err(
                        &config_path,
                        "no chat template (chat_template.jinja or `chat_template`): the \
                         pipelines read prompts as a chat turn",
                    ))
                }
            }
        };
        let mut chat = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut chat);
        chat.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        chat.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        chat.add_template_owned("chat", template)
            .map_err(|e| tok_err(&config_path, format!("the chat template: {e:#}")))?;
        let tokenizer = QwenTokenizer {
            inner,
            pad_id,
            chat,
        };
        // A template that does not render is refused at load, not per request.
        tokenizer
            .chat("", Some(false))
            .map_err(|e| tok_err(&config_path, e))?;
        Ok(tokenizer)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The prompt as the chat template lays it out: one user message and
    /// the generation prompt, with `enable_thinking` when given.
    pub fn chat(&self, prompt: &str, thinking: Option<bool>) -> Result<String> {
        let template = self
            .chat
            .get_template("chat")
            .map_err(|e| ModelError::Input(format!("the chat template: {e:#}")))?;
        let messages = vec![minijinja::context! { role => "user", content => prompt }];
        let ctx = match thinking {
            Some(t) => minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                enable_thinking => t,
            },
            None => minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
            },
        };
        template
            .render(ctx)
            .map_err(|e| ModelError::Input(format!("rendering the chat template: {e:#}")))
    }

    /// How many tokens `text` (an already templated prompt) takes.
    pub fn count(&self, text: &str) -> Result<usize> {
        Ok(self.tokens(text)?.len())
    }

    fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Input(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One templated prompt's ids and attention mask at `length` tokens.
    pub fn encode(&self, text: &str, length: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut ids: Vec<i64> = self
            .tokens(text)?
            .into_iter()
            .take(length)
            .map(i64::from)
            .collect();
        let mut mask = vec![1i64; ids.len()];
        ids.resize(length, i64::from(self.pad_id));
        mask.resize(length, 0);
        Ok((ids, mask))
    }

    /// Ids and masks for several templated prompts, each (batch, length).
    pub fn encode_batch(
        &self,
        texts: &[&str],
        length: usize,
    ) -> Result<(tch::Tensor, tch::Tensor)> {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for t in texts {
            let (i, m) = self.encode(t, length)?;
            ids.extend(i);
            mask.extend(m);
        }
        let shape = [texts.len() as i64, length as i64];
        Ok((
            tch::Tensor::from_slice(&ids).view(shape),
            tch::Tensor::from_slice(&mask).view(shape),
        ))
    }
}
