//! sdserve's default model (models/emoji, trained by
//! scripts/train_default_model.py): `sdctl up` serves it when no model is
//! given, its own defaults (sdserve.json) apply to requests that leave
//! steps and guidance unset, and it draws what it is asked — measured by
//! the nearest emoji in pixel space (tests/clients/prompt_following.py),
//! the same through the stack as in diffusers on the same weights.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{GenerateRequest, ListModelsRequest};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/emoji")
}

#[test]
fn sdctl_up_serves_the_default_model_with_its_own_defaults_and_it_follows_prompts() {
    let stack = Stack::start_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let models = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let m = &models.models[0];
        assert_eq!(m.name, "emoji");
        assert_eq!(
            (m.default_width, m.default_steps, m.default_guidance),
            (32, 8, 3.0)
        );
        let reply = c
            .generate(GenerateRequest {
                prompt: "red heart".into(),
                seed: Some(1),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let p = reply.parameters.unwrap();
        assert_eq!((p.steps, p.guidance_scale, p.width), (8, 3.0, 32));
        assert_eq!(p.scheduler, "euler-a", "the model's own scheduler");
    });
    // Prompt-following on 60 captions drawn at random from the model's list:
    // the targets, top-1 30% and top-5 60% (chance: 0.3%), through
    // the stack and in diffusers alike. Over all 320 captions the model
    // scores 44.1% / 63.4% (docs/BENCHMARKS.md).
    let report = common::run_client(
        "prompt_following.py",
        &[
            stack.http.as_ref(),
            model_dir().as_os_str(),
            "60".as_ref(),
            "--min-top1".as_ref(),
            "0.3".as_ref(),
            "--min-top5".as_ref(),
            "0.6".as_ref(),
        ],
    );
    eprintln!("{report}");
}
