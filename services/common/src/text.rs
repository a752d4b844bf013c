//! The text encoders of a model, as the text-encoder service and the
//! in-process benchmark pipeline run them: one CLIP for SD 1.x/2.x; for the
//! SDXL family both (the refiner: the second alone), their penultimate
//! hidden states concatenated and the second's pooled, projected output;
//! for FLUX, T5's last hidden states beside CLIP's pooled output.

use sd_models::{ClipTextModel, ClipTokenizer, Component, ModelDir, T5Encoder, T5Tokenizer};
use sd_runtime::metrics::Metrics;

use crate::ServiceError;

/// Most 75-token chunks one A1111 prompt may take (8 × 77 = 616 tokens,
/// what the denoiser takes).
pub const MAX_CHUNKS: usize = 8;

/// `fragments`' tokens for encoder `e`, in chunks.
fn a1111_chunks(
    e: &Encoder,
    fragments: &[sd_prompt::Fragment],
) -> Result<Vec<sd_prompt::Chunk>, ServiceError> {
    let words = fragments
        .iter()
        .map(|f| {
            if f.is_break() {
                Ok(None)
            } else {
                let ids = e
                    .tokenizer
                    .encode_words(&f.text)
                    .map_err(|err| ServiceError::model_input("prompts", err))?;
                // Textual-inversion names become their vectors' placeholders.
                let ids = crate::ti::splice(&ids, &e.inversions).0;
                Ok(Some((ids, f.weight)))
            }
        })
        .collect::<Result<Vec<_>, ServiceError>>()?;
    let vocab = e
        .tokenizer
        .vocab()
        .map_err(|err| ServiceError::model_input("prompts", err))?;
    let chunks = sd_prompt::chunks(&words, vocab, sd_prompt::chunks::COMMA_BACKTRACK);
    if chunks.len() > MAX_CHUNKS {
        return Err(ServiceError::invalid(
            "prompts",
            format_args!(
                "a prompt of {} chunks of 75 tokens; at most {MAX_CHUNKS}",
                chunks.len()
            ),
        ));
    }
    Ok(chunks)
}

/// A1111's "Original" emphasis on `z` (chunks, 77, hidden): each chunk
/// scaled by its tokens' weights, then by its mean before over its mean
/// after (1 where that ratio is not finite).
fn emphasis(z: &tch::Tensor, chunks: &[sd_prompt::Chunk]) -> Result<tch::Tensor, ServiceError> {
    let weights: Vec<f32> = chunks
        .iter()
        .flat_map(|c| c.weights.iter().map(|&w| w as f32))
        .collect();
    let (k, t, _) = z.size3()?;
    let w = tch::Tensor::from_slice(&weights)
        .view([k, t, 1])
        .to_device(z.device())
        .to_kind(z.kind());
    let dims: &[i64] = &[1, 2];
    let before = z.f_mean_dim(dims, true, z.kind())?;
    let scaled = z * &w;
    let after = scaled.f_mean_dim(dims, true, z.kind())?;
    // A chunk whose mean is zero (a random-weight encoder's final norm can
    // give exactly that) keeps its scale, where A1111's division would fill
    // it with NaN.
    let ratio = (before / after).f_nan_to_num(Some(1.0), Some(1.0), Some(1.0))?;
    Ok(scaled * ratio)
}

/// A tokenizer and the text encoder it feeds, and the textual-inversion
/// embeddings it takes.
pub struct Encoder {
    pub tokenizer: ClipTokenizer,
    pub clip: ClipTextModel,
    pub inversions: Vec<crate::ti::Inversion>,
}

impl Encoder {
    /// `prompts` as diffusers tokenizes them, with the fixes that put
    /// textual-inversion vectors in place.
    fn ids(&self, prompts: &[&str]) -> Result<(tch::Tensor, Vec<sd_models::Fix>), ServiceError> {
        let input = |e| ServiceError::model_input("prompts", e);
        let mut rows = Vec::with_capacity(prompts.len());
        let mut any = false;
        for p in prompts {
            match crate::ti::plain_ids(self, p)? {
                Some(ids) => {
                    any = true;
                    rows.push(ids);
                }
                None => rows.push(self.tokenizer.encode(p).map_err(input)?),
            }
        }
        if !any {
            return Ok((
                self.tokenizer.encode_batch(prompts).map_err(input)?,
                Vec::new(),
            ));
        }
        let fixes = crate::ti::fixes(&mut rows, &self.inversions, true);
        let len = rows[0].len() as i64;
        let flat: Vec<i64> = rows.concat();
        Ok((tch::Tensor::from_slice(&flat).view([-1, len]), fixes))
    }
}

/// T5's tokenizer and encoder (FLUX).
pub struct T5 {
    pub tokenizer: T5Tokenizer,
    pub model: T5Encoder,
}

/// The text encoders of a model.
pub enum TextEncoders {
    /// SD 1.x/2.x: one encoder; `clip_skip` counts from the last layer.
    Single(Box<Encoder>),
    /// The SDXL family: the first encoder (none for the refiner) and the
    /// second, with a projection; their penultimate hidden states
    /// concatenated, the second's pooled output beside them.
    Xl {
        first: Option<Box<Encoder>>,
        second: Box<Encoder>,
    },
    /// FLUX: CLIP for the pooled embedding, T5 for the hidden states the
    /// transformer attends to (padded to the request's length, unmasked).
    Flux { clip: Box<Encoder>, t5: Box<T5> },
    /// FLUX.2 Klein and Z-Image: Qwen3 read as an encoder, the prompt as a
    /// chat turn, padded to the request's length, read as the family does.
    Qwen(Box<Qwen>),
}

/// A Qwen3 encoder with its tokenizer, and how the family's pipeline reads
/// its hidden states.
pub struct Qwen {
    pub tokenizer: sd_models::QwenTokenizer,
    pub model: sd_models::Qwen3Encoder,
    pub reading: QwenReading,
}

/// How a pipeline reads Qwen3's hidden states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QwenReading {
    /// FLUX.2 Klein: thinking off, these hidden states side by side, every
    /// position (pads included) kept.
    Stacked(Vec<usize>),
    /// Z-Image: thinking on, the penultimate hidden state, the prompt's
    /// own tokens alone (each prompt its own length).
    Penultimate,
}

/// FLUX.2 Klein's `text_encoder_out_layers`.
pub const KLEIN_TEXT_LAYERS: [usize; 3] = [9, 18, 27];

/// The most prompt tokens (the chat template's included) the Qwen3
/// pipelines take; Klein pads every prompt to it.
pub const QWEN_MAX_SEQUENCE_LENGTH: u32 = 512;

/// Klein's name for it.
pub const KLEIN_MAX_SEQUENCE_LENGTH: u32 = QWEN_MAX_SEQUENCE_LENGTH;

impl TextEncoders {
    /// Load the model's tokenizers and text encoders (timed into `metrics`
    /// when given).
    pub fn load(
        dir: &ModelDir,
        placement: sd_models::Placement,
        metrics: Option<&Metrics>,
    ) -> anyhow::Result<Self> {
        let encoder = |c: Component| -> anyhow::Result<Encoder> {
            let second = c == Component::TextEncoder2;
            let tokenizer = crate::maybe_timed_load(
                metrics,
                if second { "tokenizer_2" } else { "tokenizer" },
                || {
                    if second {
                        dir.load_tokenizer_2()
                    } else {
                        dir.load_tokenizer()
                    }
                },
            )?;
            let clip = crate::maybe_timed_load(metrics, c.dir(), || {
                if second {
                    dir.load_text_encoder_2(placement)
                } else {
                    dir.load_text_encoder(placement)
                }
            })?;
            Ok(Encoder {
                tokenizer,
                clip,
                inversions: Vec::new(),
            })
        };
        match dir.family() {
            sd_models::Family::Sd => Ok(TextEncoders::Single(Box::new(encoder(
                Component::TextEncoder,
            )?))),
            sd_models::Family::Sdxl => {
                // The refiner has only the second.
                let first = if dir.has(Component::TextEncoder.dir())? {
                    Some(Box::new(encoder(Component::TextEncoder)?))
                } else {
                    None
                };
                Ok(TextEncoders::Xl {
                    first,
                    second: Box::new(encoder(Component::TextEncoder2)?),
                })
            }
            sd_models::Family::Flux => {
                let clip = Box::new(encoder(Component::TextEncoder)?);
                let tokenizer =
                    crate::maybe_timed_load(metrics, "tokenizer_2", || dir.load_t5_tokenizer())?;
                let model =
                    crate::maybe_timed_load(metrics, Component::TextEncoder2.dir(), || {
                        dir.load_t5(placement)
                    })?;
                Ok(TextEncoders::Flux {
                    clip,
                    t5: Box::new(T5 { tokenizer, model }),
                })
            }
            family @ (sd_models::Family::Klein | sd_models::Family::ZImage) => {
                let tokenizer =
                    crate::maybe_timed_load(metrics, "tokenizer", || dir.load_qwen_tokenizer())?;
                let model = crate::maybe_timed_load(metrics, Component::TextEncoder.dir(), || {
                    dir.load_qwen3(placement)
                })?;
                let layers = model.config().num_hidden_layers as usize;
                let reading = if family == sd_models::Family::Klein {
                    anyhow::ensure!(
                        KLEIN_TEXT_LAYERS.iter().all(|&l| l <= layers),
                        "text_encoder/config.json: {layers} layers, FLUX.2 Klein reads hidden \
                         states {KLEIN_TEXT_LAYERS:?}"
                    );
                    QwenReading::Stacked(KLEIN_TEXT_LAYERS.to_vec())
                } else {
                    anyhow::ensure!(
                        layers >= 2,
                        "text_encoder/config.json: Z-Image reads the penultimate of at least 2 layers"
                    );
                    QwenReading::Penultimate
                };
                Ok(TextEncoders::Qwen(Box::new(Qwen {
                    tokenizer,
                    model,
                    reading,
                })))
            }
        }
    }

    /// Whether prompts are padded to a requested length (T5, Qwen3).
    pub fn takes_length(&self) -> bool {
        matches!(self, TextEncoders::Flux { .. } | TextEncoders::Qwen(_))
    }

    /// Whether each prompt's embedding has its own length (Z-Image keeps a
    /// prompt's own tokens): prompts are then encoded one at a time.
    pub fn per_prompt_length(&self) -> bool {
        matches!(self, TextEncoders::Qwen(q) if q.reading == QwenReading::Penultimate)
    }

    pub fn encoders(&self) -> Vec<&Encoder> {
        match self {
            TextEncoders::Single(e) => vec![e.as_ref()],
            TextEncoders::Xl { first, second } => {
                first.iter().chain([second]).map(|e| e.as_ref()).collect()
            }
            TextEncoders::Flux { clip, .. } => vec![clip.as_ref()],
            TextEncoders::Qwen(_) => Vec::new(),
        }
    }

    /// FLUX's T5 (None for the other families).
    pub fn t5(&self) -> Option<&T5> {
        match self {
            TextEncoders::Flux { t5, .. } => Some(t5),
            TextEncoders::Single(_) | TextEncoders::Xl { .. } | TextEncoders::Qwen(_) => None,
        }
    }

    /// What the Info call says: (hidden size, max tokens, clip_skip bound,
    /// pooled size).
    pub fn shape(&self) -> (i64, i64, i64, i64) {
        if let TextEncoders::Flux { clip, t5 } = self {
            // No clip_skip: FLUX reads CLIP's pooled output alone.
            return (
                t5.model.hidden_size(),
                t5.tokenizer.max_length() as i64,
                1,
                clip.clip.hidden_size(),
            );
        }
        if let TextEncoders::Qwen(q) = self {
            let states = match &q.reading {
                QwenReading::Stacked(layers) => layers.len() as i64,
                QwenReading::Penultimate => 1,
            };
            return (
                q.model.hidden_size() * states,
                i64::from(QWEN_MAX_SEQUENCE_LENGTH),
                1,
                0,
            );
        }
        let encoders = self.encoders();
        let hidden = encoders.iter().map(|e| e.clip.hidden_size()).sum();
        let tokens = encoders
            .iter()
            .map(|e| e.tokenizer.max_length() as i64)
            .min()
            .unwrap_or(0);
        let layers = encoders
            .iter()
            .map(|e| e.clip.config().num_hidden_layers)
            .min()
            .unwrap_or(0);
        match self {
            TextEncoders::Single(_) | TextEncoders::Flux { .. } | TextEncoders::Qwen(_) => {
                (hidden, tokens, layers, 0)
            }
            TextEncoders::Xl { second, .. } => (
                hidden,
                tokens,
                layers - 1,
                second
                    .clip
                    .config()
                    .projection_dim
                    .unwrap_or(second.clip.hidden_size()),
            ),
        }
    }

    /// Token ids (the first encoder's; FLUX: T5's), hidden states and, for
    /// SDXL and FLUX, the pooled embeddings of `prompts`. `length`: FLUX's
    /// T5 tokens per prompt (the others ignore it).
    pub fn encode(
        &self,
        prompts: &[&str],
        clip_skip: usize,
        length: usize,
    ) -> Result<(tch::Tensor, tch::Tensor, Option<tch::Tensor>), ServiceError> {
        let tokens = |e: &Encoder| {
            e.tokenizer
                .encode_batch(prompts)
                .map_err(|e| ServiceError::model_input("prompts", e))
        };
        match self {
            TextEncoders::Single(e) => {
                let (ids, fixes) = e.ids(prompts)?;
                let hidden = e.clip.forward_fixed(&ids, clip_skip, &fixes)?;
                Ok((ids, hidden, None))
            }
            TextEncoders::Xl { .. } => {
                let mut hidden = Vec::new();
                let (mut first_ids, mut pooled) = (None, None);
                for e in self.encoders() {
                    let (ids, fixes) = e.ids(prompts)?;
                    let out = e.clip.forward_xl_fixed(&ids, clip_skip, &fixes)?;
                    hidden.push(out.hidden);
                    pooled = Some(out.pooled);
                    first_ids.get_or_insert(ids);
                }
                let ids = first_ids.ok_or_else(|| ServiceError::Task("no text encoder".into()))?;
                Ok((ids, tch::Tensor::f_cat(&hidden, -1)?, pooled))
            }
            TextEncoders::Flux { clip, t5 } => {
                // diffusers: CLIP's pooled output (77 tokens, cut), T5's
                // last hidden states at `length` tokens, pads included.
                let pooled = clip.clip.forward_xl(&tokens(clip)?, 0)?.pooled;
                let ids = t5
                    .tokenizer
                    .encode_batch(prompts, length)
                    .map_err(|e| ServiceError::model_input("prompts", e))?;
                let hidden = t5.model.forward(&ids)?;
                Ok((ids, hidden, Some(pooled)))
            }
            TextEncoders::Qwen(q) => {
                let input = |e| ServiceError::model_input("prompts", e);
                let thinking = q.reading == QwenReading::Penultimate;
                let texts = prompts
                    .iter()
                    .map(|p| q.tokenizer.chat(p, Some(thinking)).map_err(input))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let (ids, mask) = q.tokenizer.encode_batch(&refs, length).map_err(input)?;
                match &q.reading {
                    QwenReading::Stacked(layers) => {
                        let hidden = q.model.hidden_states(&ids, &mask, layers)?;
                        Ok((ids, sd_models::qwen3::stacked(&hidden), None))
                    }
                    QwenReading::Penultimate => {
                        // One prompt: its own tokens (per_prompt_length).
                        if prompts.len() != 1 {
                            return Err(ServiceError::Task(
                                "Z-Image prompts are encoded one at a time".into(),
                            ));
                        }
                        let layers = q.model.config().num_hidden_layers as usize;
                        let hidden = q.model.hidden_states(&ids, &mask, &[layers - 1])?;
                        let n = mask.sum(tch::Kind::Int64).int64_value(&[]);
                        Ok((ids.narrow(1, 0, n), hidden[0].narrow(1, 0, n), None))
                    }
                }
            }
        }
    }

    /// One prompt in AUTOMATIC1111's syntax (1.10): attention weights,
    /// `BREAK`, any length in 75-token chunks. Each 77-token chunk goes
    /// through the encoder on its own; its hidden states are scaled by the
    /// per-token weights and brought back to the chunk's mean before
    /// (A1111's "Original" emphasis) — per encoder for SDXL, whose pooled
    /// embedding is the first chunk's. The chunks are concatenated: hidden
    /// states (77·k, hidden), and the first encoder's ids.
    pub fn encode_a1111(
        &self,
        prompt: &str,
        clip_skip: usize,
        length: usize,
    ) -> Result<(Vec<i64>, tch::Tensor, Option<tch::Tensor>), ServiceError> {
        if self.takes_length() {
            // T5 or Qwen3 reads the text; attention weights and BREAK are
            // refused rather than silently read as words.
            let text = sd_prompt::unweighted(prompt).map_err(|e| {
                ServiceError::invalid("prompts", format_args!("FLUX (T5/Qwen3) prompt: {e}"))
            })?;
            let (ids, hidden, pooled) = self.encode(&[text.as_str()], 0, length)?;
            let ids = Vec::<i64>::try_from(ids.flatten(0, -1))?;
            return Ok((ids, hidden, pooled));
        }
        let fragments = sd_prompt::parse(prompt);
        let mut hidden = Vec::new();
        let (mut first_ids, mut pooled) = (None, None);
        for e in self.encoders() {
            let chunks = a1111_chunks(e, &fragments)?;
            let mut rows: Vec<Vec<i64>> = chunks.iter().map(|c| c.ids.clone()).collect();
            let fixes = crate::ti::fixes(&mut rows, &e.inversions, false);
            let ids: Vec<i64> = rows.concat();
            let k = chunks.len() as i64;
            let ids_t = tch::Tensor::from_slice(&ids).view([k, -1]);
            let z = match self {
                TextEncoders::Single(_) | TextEncoders::Flux { .. } | TextEncoders::Qwen(_) => {
                    e.clip.forward_fixed(&ids_t, clip_skip, &fixes)?
                }
                TextEncoders::Xl { .. } => {
                    let out = e.clip.forward_xl_fixed(&ids_t, clip_skip, &fixes)?;
                    pooled = Some(out.pooled.narrow(0, 0, 1));
                    out.hidden
                }
            };
            let z = emphasis(&z, &chunks)?;
            let c = z.size()[2];
            hidden.push(z.reshape([1, -1, c]));
            first_ids.get_or_insert(ids);
        }
        let ids = first_ids.ok_or_else(|| ServiceError::Task("no text encoder".into()))?;
        Ok((ids, tch::Tensor::f_cat(&hidden, -1)?, pooled))
    }

    /// The text encoders' LoRA-capable layers together.
    pub fn modules(&self) -> sd_models::lora::ModuleIndex {
        let mut index = sd_models::lora::ModuleIndex::default();
        for e in self.encoders() {
            index.merge(e.clip.modules());
        }
        if let Some(t5) = self.t5() {
            index.merge(t5.model.modules());
        }
        if let TextEncoders::Qwen(q) = self {
            index.merge(q.model.modules());
        }
        index
    }

    /// The components whose weights make this model's identity.
    pub fn components(&self) -> &'static [Component] {
        match self {
            TextEncoders::Single(_) => &[Component::TextEncoder],
            TextEncoders::Xl { first: Some(_), .. } => {
                &[Component::TextEncoder, Component::TextEncoder2]
            }
            TextEncoders::Xl { first: None, .. } => &[Component::TextEncoder2],
            TextEncoders::Flux { .. } => &[Component::TextEncoder, Component::TextEncoder2],
            TextEncoders::Qwen(_) => &[Component::TextEncoder],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::emphasis;
    use sd_prompt::Chunk;

    fn chunk(weights: &[f64]) -> Chunk {
        Chunk {
            ids: vec![0; weights.len()],
            weights: weights.to_vec(),
        }
    }

    #[test]
    fn emphasis_scales_tokens_and_restores_the_chunk_mean() {
        let z = tch::Tensor::from_slice(&[1.0f32, 3.0, 2.0, 2.0]).view([1, 2, 2]);
        let out = emphasis(&z, &[chunk(&[1.0, 2.0])]).unwrap();
        let got: Vec<f32> = Vec::try_from(out.flatten(0, -1)).unwrap();
        // Scaled to [1, 3, 4, 4] (mean 3), then by 2/3 back to mean 2.
        let want = [2.0 / 3.0, 2.0, 8.0 / 3.0, 8.0 / 3.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn a_chunk_of_mean_zero_keeps_its_scale_instead_of_nan() {
        let z = tch::Tensor::from_slice(&[1.0f32, -1.0, 2.0, -2.0]).view([1, 2, 2]);
        for weights in [[1.0, 1.0], [1.0, 1.5]] {
            let out = emphasis(&z, &[chunk(&weights)]).unwrap();
            let got: Vec<f32> = Vec::try_from(out.flatten(0, -1)).unwrap();
            assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
            assert_eq!(got[0], 1.0, "{got:?}");
        }
    }
}
