//! The SDXL family through the services: the text encoder service gives
//! both encoders' penultimate hidden states, concatenated, and the pooled
//! embedding, equal to diffusers' `StableDiffusionXLPipeline.encode_prompt`
//! on `sdxl-tiny` (whose second tokenizer pads with "!", which a prompt's
//! "!" must then be split as); and whole generations through `sdctl up`
//! equal the pipeline's images (`make_xl_models.py` writes both).

#![allow(clippy::unwrap_used)]

mod common;

use common::procs::Proc;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{EncodeTextRequest, TextEncoderInfoRequest};
use sd_proto::wire::HostTensor;
use tch::Tensor;

fn tensor(t: &sd_proto::v1::Tensor) -> Tensor {
    let h = HostTensor::from_wire(t).unwrap();
    Tensor::from_slice(&h.data).reshape(&h.shape)
}

#[tokio::test]
async fn the_text_encoder_service_encodes_with_both_sdxl_encoders() {
    let model = common::model("sdxl-tiny");
    let r = common::reference("sdxl-tiny");
    let prompts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(model.join("reference_prompts.json")).unwrap(),
    )
    .unwrap();
    let p = Proc::spawn(
        "sd-text-encoder",
        &["--model".into(), model.to_string_lossy().into_owned()],
        &[],
    );
    p.wait_serving(std::time::Duration::from_secs(60)).await;
    let mut c = TextEncoderClient::connect(p.url()).await.unwrap();
    let info = c
        .info(TextEncoderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // Two 32-wide encoders, 4 layers each (clip_skip below 3), pooled 32.
    assert_eq!(
        (info.hidden_size, info.num_layers, info.pooled_size),
        (64, 3, 32)
    );
    for skip in [0u32, 1] {
        let out = c
            .encode(EncodeTextRequest {
                prompts: prompts.clone(),
                clip_skip: skip,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let hidden: Vec<Tensor> = out
            .prompts
            .iter()
            .map(|p| tensor(p.embeddings.as_ref().unwrap()))
            .collect();
        let pooled: Vec<Tensor> = out
            .prompts
            .iter()
            .map(|p| tensor(p.pooled.as_ref().expect("a pooled embedding")))
            .collect();
        common::assert_close(
            &format!("sdxl hidden, clip_skip {skip}"),
            &Tensor::stack(&hidden, 0),
            &r[&format!("text.embeds.skip{skip}")],
        );
        common::assert_close(
            &format!("sdxl pooled, clip_skip {skip}"),
            &Tensor::stack(&pooled, 0),
            &r[&format!("text.pooled.skip{skip}")],
        );
    }
    // clip_skip at the bound is refused, naming the field.
    let e = c
        .encode(EncodeTextRequest {
            prompts: vec!["x".into()],
            clip_skip: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("clip_skip"), "{}", e.message());
}

#[test]
fn sdxl_generations_match_diffusers_images() {
    common::e2e::run_model("sdxl-tiny");
}

#[test]
fn turbo_style_generations_match_diffusers_images() {
    common::e2e::run_model("sdxl-turbo-tiny");
}

#[test]
fn an_lcm_unet_takes_guidance_as_diffusers_does() {
    common::e2e::run_model("sdxl-lcm-tiny");
}

#[test]
fn the_refiner_matches_diffusers_image_to_image() {
    common::e2e::run_model("sdxl-refiner-tiny");
}
