//! The Qwen3 text encoder FLUX.2 Klein and Z-Image read prompts with, on
//! the tiny encoder `make_qwen3_reference.py` writes: the chat template and
//! the Qwen tokenizer give transformers' ids and masks (thinking on and
//! off, a prompt cut at 512 tokens, unicode, an empty prompt), and the
//! encoder gives what diffusers' pipelines compute — Klein's hidden layers
//! 9, 18 and 27 side by side over all 512 positions, Z-Image's penultimate
//! hidden state over the prompt's tokens — in float32 and bfloat16.

#![allow(clippy::unwrap_used)]

mod common;

use sd_models::{Placement, Qwen3Encoder, QwenTokenizer, Weights};
use tch::{Kind, Tensor};

const LENGTH: usize = 512;

fn dir() -> std::path::PathBuf {
    common::model("qwen3-tiny")
}

fn prompts() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(dir().join("prompts.json")).unwrap()).unwrap()
}

fn encoder(kind: Kind) -> Qwen3Encoder {
    let te = dir().join("text_encoder");
    let placement = Placement {
        device: tch::Device::Cpu,
        kind,
    };
    let w = Weights::open(&te.join("model.safetensors"), placement).unwrap();
    Qwen3Encoder::load(&te.join("config.json"), &w).unwrap()
}

fn inputs(tok: &QwenTokenizer, thinking: bool) -> (Tensor, Tensor) {
    let texts: Vec<String> = prompts()
        .iter()
        .map(|p| tok.chat(p, Some(thinking)).unwrap())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    tok.encode_batch(&refs, LENGTH).unwrap()
}

/// Largest difference relative to the reference's largest magnitude.
fn relative(got: &Tensor, want: &Tensor) -> f64 {
    common::max_abs_diff(got, want) / want.abs().max().double_value(&[])
}

#[test]
fn the_chat_template_and_tokenizer_match_transformers() {
    let r = common::reference("qwen3-tiny");
    let tok = QwenTokenizer::load(&dir().join("tokenizer")).unwrap();
    for (i, p) in prompts().iter().enumerate() {
        for (thinking, key) in [(false, "plain"), (true, "thinking")] {
            let (ids, mask) = tok
                .encode(&tok.chat(p, Some(thinking)).unwrap(), LENGTH)
                .unwrap();
            let want_ids = &r[&format!("ids.{i}.{key}")];
            assert!(
                Tensor::from_slice(&ids).equal(want_ids),
                "prompt {i} ({key}): ids differ\n{:?}\n{want_ids}",
                &ids[..40]
            );
            assert!(
                Tensor::from_slice(&mask).equal(&r[&format!("mask.{i}.{key}")]),
                "prompt {i} ({key}): masks differ"
            );
        }
    }
    // Thinking off opens an empty think block; the long prompt is cut.
    let off = tok.chat("x", Some(false)).unwrap();
    assert!(off.ends_with("<think>\n\n</think>\n\n"), "{off:?}");
    assert!(!tok.chat("x", Some(true)).unwrap().contains("<think>"));
    assert!(tok.count(&tok.chat(&prompts()[2], None).unwrap()).unwrap() > LENGTH);
}

#[test]
fn klein_and_z_image_prompt_embeddings_match_diffusers() {
    let r = common::reference("qwen3-tiny");
    let tok = QwenTokenizer::load(&dir().join("tokenizer")).unwrap();
    for (kind, name, bound) in [(Kind::Float, "f32", 1e-5), (Kind::BFloat16, "bf16", 1e-2)] {
        let te = encoder(kind);
        let layers = te.config().num_hidden_layers as usize;
        // Klein: thinking off, layers 9, 18, 27 side by side.
        let (ids, mask) = inputs(&tok, false);
        let hidden = te.hidden_states(&ids, &mask, &[9, 18, 27]).unwrap();
        let klein = sd_models::qwen3::stacked(&hidden).to_kind(Kind::Float);
        let d = relative(&klein, &r[&format!("klein.{name}")]);
        eprintln!("Klein {name}: max |diff| / max |ref| = {d:.2e}");
        assert!(d <= bound, "Klein {name}: {d:.2e} > {bound:e}");
        // Z-Image: thinking on, the penultimate state, the prompt's tokens.
        let (ids, mask) = inputs(&tok, true);
        let hidden = te.hidden_states(&ids, &mask, &[layers - 1]).unwrap();
        for i in 0..prompts().len() as i64 {
            let n = mask.get(i).sum(Kind::Int64).int64_value(&[]);
            let got = hidden[0].get(i).narrow(0, 0, n).to_kind(Kind::Float);
            let d = relative(&got, &r[&format!("zimage.{i}.{name}")]);
            eprintln!("Z-Image {name} prompt {i}: {d:.2e}");
            assert!(d <= bound, "Z-Image {name} prompt {i}: {d:.2e} > {bound:e}");
        }
    }
}

#[test]
fn hidden_states_are_numbered_as_transformers_numbers_them() {
    let te = encoder(Kind::Float);
    let layers = te.config().num_hidden_layers as usize;
    let ids = Tensor::from_slice(&[5i64, 9, 11, 0]).view([1, 4]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0]).view([1, 4]);
    let all = te
        .hidden_states(&ids, &mask, &[0, layers - 1, layers, 3])
        .unwrap();
    // 0 is the embeddings; a later state depends on fewer layers run.
    let again = te.hidden_states(&ids, &mask, &[3]).unwrap();
    assert!(all[3].equal(&again[0]));
    assert!(
        common::max_abs_diff(&all[1], &all[2]) > 1e-3,
        "the last state is normed"
    );
    // A token's states do not depend on the padding after it.
    let longer = Tensor::from_slice(&[5i64, 9, 11, 0, 0, 0]).view([1, 6]);
    let longer_mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 0]).view([1, 6]);
    let l = te
        .hidden_states(&longer, &longer_mask, &[layers - 1])
        .unwrap();
    assert!(common::max_abs_diff(&l[0].narrow(1, 0, 3), &all[1].narrow(1, 0, 3)) < 1e-5);
    // Out of range: errors, not aborts.
    assert!(te.hidden_states(&ids, &mask, &[layers + 1]).is_err());
    let bad = Tensor::from_slice(&[1_000_000i64]).view([1, 1]);
    assert!(te
        .hidden_states(
            &bad,
            &Tensor::ones([1, 1], (Kind::Int64, tch::Device::Cpu)),
            &[1]
        )
        .is_err());
    assert!(te
        .hidden_states(
            &ids,
            &Tensor::ones([1, 3], (Kind::Int64, tch::Device::Cpu)),
            &[1]
        )
        .is_err());
}
