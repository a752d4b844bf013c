//! Textual-inversion embeddings (`--embeddings-dir`) through the running
//! stack, against diffusers' `load_textual_inversion` on the tiny fixtures
//! (`make_ti_reference.py`): a kohya `emb_params` file with a two-token
//! name and three vectors, a diffusers one-tensor file, in the prompt, the
//! negative prompt and both, read plainly and in A1111's syntax (the same
//! vectors in place of the name's tokens); SDXL's clip_l + clip_g; A1111's
//! `/sdapi/v1/embeddings` listing what loaded and what was skipped (a
//! pickle, another model's width), and the TI hashes each generation used.

#![allow(clippy::unwrap_used)]

mod common;

use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;

/// `a1111`: also read in A1111's syntax against the same references
/// (SD 1: the same; SDXL's pooled output differs — diffusers pools at the
/// added token, legacy configs' largest id; A1111 at the end token).
fn run(model: &str, dir: &str, a1111: bool) -> Stack {
    let refs = common::fixtures().join("ti").join(dir);
    let emb = refs.join("embeddings");
    let stack = Stack::start_with(
        &common::model(model),
        &["--embeddings-dir", emb.to_str().unwrap()],
    );
    let mut cases = common::e2e::load_cases(&refs);
    // A1111's reading of the same (unweighted) prompts gives the same.
    let a1111: Vec<_> = cases
        .iter()
        .filter(|_| a1111)
        .map(|c| {
            let mut params = c.params.clone();
            params["prompt_syntax"] = "a1111".into();
            common::e2e::Case {
                name: format!("{}-a1111", c.name),
                params,
                files: c.files.clone(),
            }
        })
        .collect();
    cases.extend(a1111);
    common::e2e::check_all_in(&stack.url, &cases, &refs, &refs, model);
    stack
}

#[test]
fn sd_embeddings_match_diffusers_load_textual_inversion() {
    let stack = run("sd1-tiny", "sd1", true);
    // The listing, as A1111 answers it.
    let (status, body) = common::raw::exchange(
        &stack.http,
        b"GET /sdapi/v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["loaded"]["zorblat"]["vectors"], 3, "{body}");
    assert_eq!(body["loaded"]["zorblat"]["shape"], 32, "{body}");
    assert_eq!(body["loaded"]["crimson"]["vectors"], 1, "{body}");
    for skipped in ["toowide", "pickled"] {
        assert!(body["skipped"][skipped].is_object(), "{skipped}: {body}");
        assert!(body["loaded"].get(skipped).is_none(), "{body}");
    }
    // Each generation names the embeddings it used, with the file's hash.
    let file = common::fixtures().join("ti/sd1/embeddings/zorblat.safetensors");
    let want = {
        let out = std::process::Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..12].to_string()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let params = rt.block_on(async {
        let mut c = GenerationClient::connect(stack.url.clone()).await.unwrap();
        c.generate(sd_proto::v1::GenerateRequest {
            prompt: "a zorblat".into(),
            negative_prompt: "crimson".into(),
            steps: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .parameters
        .unwrap()
    });
    assert_eq!(params.textual_inversions.len(), 2, "{params:?}");
    assert_eq!(params.textual_inversions[0], format!("zorblat: {want}"));
    assert!(params.textual_inversions[1].starts_with("crimson: "));
}

#[test]
fn sdxl_embeddings_with_clip_l_and_clip_g_match_diffusers() {
    run("sdxl-tiny", "xl", false);
}
