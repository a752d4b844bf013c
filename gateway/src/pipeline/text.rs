//! Conditioning on the text: the prompt's (and, when guided, the negative
//! prompt's) embeddings, from the prompt cache or one Encode call per
//! clip_skip; and which of them the denoiser still has to be sent.

use std::time::Instant;

use sd_proto::v1::{
    Dtype, Embedding, EncodeTextRequest, LoraInfo, LoraRef, PromptSyntax, SessionTensor,
    Tensor as WireTensor,
};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Phase;
use tracing::Instrument;

use super::Generator;
use crate::error::{Error, Result, Stage};
use crate::plan::Plan;
use crate::prompt_cache::{CachedEmbedding, PromptKey};

/// A text conditioning for Predict: sent in full until the denoiser has it.
struct Conditioning {
    embedding: CachedEmbedding,
    sent: bool,
}

impl Conditioning {
    fn new(embedding: CachedEmbedding) -> Self {
        Conditioning {
            embedding,
            sent: false,
        }
    }

    fn message(&self) -> Embedding {
        Embedding {
            id: self.embedding.id.clone(),
            tensor: (!self.sent).then(|| self.embedding.tensor.clone()),
            pooled: if self.sent {
                None
            } else {
                self.embedding.pooled.clone()
            },
        }
    }
}

/// What guides every step: the prompt, the negative prompt (when guided),
/// the guidance scale, and the session tensors (for SDXL models each
/// latent's time ids), each sent in full until the denoiser has it.
pub(super) struct Text {
    cond: Conditioning,
    uncond: Option<Conditioning>,
    /// The classifier-free guidance scale (with `uncond`).
    pub guidance: f32,
    /// The guidance a guidance-distilled network takes as its input
    /// (FLUX.1-dev), sent beside it.
    pub embedded_guidance: Option<f32>,
    /// The generation's session tensors by name (their ids too: a stream
    /// holds one generation's).
    session: Vec<(&'static str, WireTensor)>,
    session_sent: bool,
}

impl Text {
    /// The conditionings as the next Predict carries them.
    pub fn messages(&self) -> (Embedding, Option<Embedding>) {
        (
            self.cond.message(),
            self.uncond.as_ref().map(Conditioning::message),
        )
    }

    /// The session tensors as the next Predict carries them.
    pub fn session_tensors(&self) -> Vec<SessionTensor> {
        self.session
            .iter()
            .map(|(name, t)| SessionTensor {
                name: name.to_string(),
                id: name.to_string(),
                tensor: (!self.session_sent).then(|| t.clone()),
            })
            .collect()
    }

    /// The textual-inversion embeddings the prompts used, by name (the
    /// prompt's first).
    pub fn textual_inversions(&self) -> Vec<String> {
        let mut names = self.cond.embedding.textual_inversions.clone();
        for n in self
            .uncond
            .iter()
            .flat_map(|u| &u.embedding.textual_inversions)
        {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    /// Add a session tensor (sent with the next Predict, then by id).
    pub fn add_session_tensor(&mut self, name: &'static str, tensor: WireTensor) {
        self.session.push((name, tensor));
        self.session_sent = false;
    }

    /// Whether the steps are guided (a negative prompt goes along).
    pub fn guided(&self) -> bool {
        self.uncond.is_some()
    }

    /// The denoiser has the tensors now: send ids only.
    pub fn mark_sent(&mut self) {
        self.set_sent(true);
    }

    /// The denoiser lost them (evicted, or a new replica): send them again.
    pub fn resend(&mut self) {
        self.set_sent(false);
    }

    fn set_sent(&mut self, sent: bool) {
        self.session_sent = sent;
        self.cond.sent = sent;
        if let Some(u) = self.uncond.as_mut() {
            u.sent = sent;
        }
    }
}

impl Generator {
    /// The text conditioning of `plan`.
    /// `lora_key`: the request's LoRA set as the prompt cache keys it
    /// ([`canonical_loras`]).
    pub(super) async fn condition(
        &self,
        plan: &Plan,
        lora_key: &str,
        deadline: &Deadline,
    ) -> Result<Text> {
        // diffusers applies clip_skip to the prompt, not to the negative
        // prompt (AUTOMATIC1111 to both); SDXL pipelines with
        // force_zeros_for_empty_prompt guide an empty negative prompt by
        // zeros instead of an encoded "" (A1111's too).
        let zeros = plan.guided()
            && plan.negative_prompt.is_empty()
            && self
                .facts
                .profile
                .sdxl()
                .is_some_and(|x| x.force_zeros_for_empty_prompt);
        let syntax = plan.prompt_syntax as i32;
        let negative_skip = if plan.prompt_syntax == PromptSyntax::A1111 {
            plan.clip_skip
        } else {
            0
        };
        let msl = plan.max_sequence_length;
        let mut wanted = vec![(plan.prompt.as_str(), plan.clip_skip, syntax, msl)];
        if plan.guided() && !zeros {
            wanted.push((plan.negative_prompt.as_str(), negative_skip, syntax, msl));
        }
        let started = Instant::now();
        let mut embeddings = self
            .embeddings(&wanted, (&plan.loras, lora_key), deadline)
            .await?
            .into_iter();
        self.metrics.step(Phase::Text, started.elapsed());
        let cond = embeddings
            .next()
            .ok_or_else(|| Error::Internal("no prompt embedding".into()))?;
        let uncond = if zeros {
            Some(zeros_like(&cond, &self.facts.text_model_id))
        } else {
            embeddings.next()
        };
        Ok(Text {
            cond: Conditioning::new(cond),
            uncond: uncond.map(Conditioning::new),
            guidance: plan.cfg_scale(),
            embedded_guidance: plan.embedded_guidance(),
            session: time_id_rows(plan)?
                .map(|(pos, neg)| vec![("time_ids", pos), ("negative_time_ids", neg)])
                .unwrap_or_default(),
            session_sent: false,
        })
    }

    /// Embeddings for each (prompt, clip_skip, syntax, max_sequence_length),
    /// from the cache or the text encoder, in order.
    async fn embeddings(
        &self,
        wanted: &[(&str, u32, i32, u32)],
        (loras, lora_key): (&[LoraRef], &str),
        deadline: &Deadline,
    ) -> Result<Vec<CachedEmbedding>> {
        let keys: Vec<PromptKey> = wanted
            .iter()
            .map(|(prompt, clip_skip, syntax, msl)| PromptKey {
                model: self.facts.text_model_id.clone(),
                clip_skip: *clip_skip,
                syntax: *syntax,
                prompt: prompt.to_string(),
                max_sequence_length: *msl,
                loras: lora_key.to_string(),
            })
            .collect();
        let mut found = self.cached(&keys)?;
        let mut calls: Vec<(u32, i32, u32)> = keys
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(k, _)| (k.clip_skip, k.syntax, k.max_sequence_length))
            .collect();
        calls.sort_unstable();
        calls.dedup();
        for call in calls {
            self.encode_missing(&keys, &mut found, call, loras, deadline)
                .await?;
        }
        found
            .into_iter()
            .map(|f| f.ok_or_else(|| Error::Internal("prompt embedding missing".into())))
            .collect()
    }

    fn cached(&self, keys: &[PromptKey]) -> Result<Vec<Option<CachedEmbedding>>> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Internal("prompt cache poisoned".into()))?;
        let found: Vec<_> = keys.iter().map(|k| cache.get(k)).collect();
        for f in &found {
            self.metrics.cache_lookup("prompt", f.is_some());
        }
        Ok(found)
    }

    /// One Encode call for the prompts with this (clip_skip, syntax,
    /// max_sequence_length) not found yet; the results go into `found` and
    /// the cache.
    async fn encode_missing(
        &self,
        keys: &[PromptKey],
        found: &mut [Option<CachedEmbedding>],
        (clip_skip, syntax, max_sequence_length): (u32, i32, u32),
        loras: &[LoraRef],
        deadline: &Deadline,
    ) -> Result<()> {
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| {
                found[i].is_none()
                    && keys[i].clip_skip == clip_skip
                    && keys[i].syntax == syntax
                    && keys[i].max_sequence_length == max_sequence_length
            })
            .collect();
        let request = EncodeTextRequest {
            prompts: missing.iter().map(|&i| keys[i].prompt.clone()).collect(),
            clip_skip,
            dtype: Dtype::Float32 as i32,
            syntax,
            loras: loras.to_vec(),
            max_sequence_length,
        };
        let span = tracing::info_span!("text_encode", clip_skip, replica = tracing::field::Empty);
        let response = self
            .stages
            .encode_text(request, deadline)
            .instrument(span)
            .await?;
        if response.prompts.len() != missing.len() {
            return Err(Error::bad_reply(
                Stage::TextEncoder,
                format!(
                    "{} embeddings for {} prompts",
                    response.prompts.len(),
                    missing.len()
                ),
            ));
        }
        for (&i, encoded) in missing.iter().zip(response.prompts) {
            let mut tensor = encoded
                .embeddings
                .ok_or_else(|| Error::bad_reply(Stage::TextEncoder, "no embeddings"))?;
            sd_proto::wire::validate(&tensor)
                .map_err(|e| Error::bad_reply(Stage::TextEncoder, format!("embeddings: {e}")))?;
            tensor.shape.insert(0, 1);
            let pooled = match encoded.pooled {
                Some(mut p) => {
                    sd_proto::wire::validate(&p).map_err(|e| {
                        Error::bad_reply(Stage::TextEncoder, format!("pooled: {e}"))
                    })?;
                    p.shape.insert(0, 1);
                    Some(p)
                }
                None => None,
            };
            let embedding = CachedEmbedding {
                id: keys[i].embedding_id(),
                tensor,
                pooled,
                textual_inversions: encoded.textual_inversions.clone(),
            };
            if let Ok(mut cache) = self.cache.lock() {
                cache.insert(keys[i].clone(), embedding.clone());
            }
            found[i] = Some(embedding);
        }
        Ok(())
    }
}

/// An embedding of zeros shaped like `like` (and its pooled embedding):
/// SDXL's unconditional embedding for an empty negative prompt. Its id
/// names the shape and the text model, so the denoiser caches it once.
fn zeros_like(like: &CachedEmbedding, model: &str) -> CachedEmbedding {
    let zeros = |t: &WireTensor| WireTensor {
        shape: t.shape.clone(),
        dtype: t.dtype,
        data: vec![0u8; t.data.len()].into(),
    };
    let key = PromptKey {
        model: model.to_string(),
        clip_skip: u32::MAX,
        syntax: 0,
        max_sequence_length: 0,
        prompt: format!(
            "zeros {:?} {:?}",
            like.tensor.shape,
            like.pooled.as_ref().map(|p| &p.shape)
        ),
        loras: String::new(),
    };
    CachedEmbedding {
        id: key.embedding_id(),
        tensor: zeros(&like.tensor),
        pooled: like.pooled.as_ref().map(zeros),
        textual_inversions: Vec::new(),
    }
}

/// The plan's time ids as (images, n) tensors, positive and negative.
fn time_id_rows(plan: &Plan) -> Result<Option<(WireTensor, WireTensor)>> {
    let Some(t) = &plan.time_ids else {
        return Ok(None);
    };
    let rows = |v: &[f32]| -> Result<WireTensor> {
        let data: Vec<f32> = (0..plan.num_images)
            .flat_map(|_| v.iter().copied())
            .collect();
        HostTensor::new(vec![i64::from(plan.num_images), v.len() as i64], data)
            .map(|h| h.to_wire(Dtype::Float32))
            .map_err(|e| Error::Internal(format!("time ids: {e}")))
    };
    Ok(Some((rows(&t.positive)?, rows(&t.negative)?)))
}

/// A LoRA set as the prompt cache keys it: sorted by name,
/// `name@version:scale` joined by `;` (the version as the denoiser lists
/// the file, so a replaced file is another key; scales as their exact
/// bits' decimal), adapters at scale 0 left out (they change nothing).
pub(crate) fn canonical_loras(loras: &[LoraRef], listed: &[LoraInfo]) -> String {
    let mut v: Vec<String> = loras
        .iter()
        .filter(|l| l.for_text_encoder() != 0.0)
        .map(|l| {
            let version = listed
                .iter()
                .find(|i| i.name == l.name)
                .map_or("", |i| i.version.as_str());
            format!("{}@{version}:{}", l.name, l.for_text_encoder())
        })
        .collect();
    v.sort();
    v.join(";")
}
