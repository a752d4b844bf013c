//! Any bytes as a GenerateRequest on the wire: a plan or a clean refusal
//! (INVALID_ARGUMENT / NOT_FOUND), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sd_gateway::error::Error;
use sd_gateway::facts::ModelFacts;
use sd_gateway::limits::Limits;
use sd_gateway::plan::Plan;
use sd_proto::v1::GenerateRequest;
use sd_sampling::{Prediction, SchedulerConfig, SchedulerKind};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = GenerateRequest::decode(data) else { return };
    let facts = ModelFacts {
        id: "fuzz@1".into(),
        name: "fuzz".into(),
        latent_channels: 4,
        scale_factor: 8,
        sample_size: 64,
        scaling_factor: 0.18215,
        max_decode_pixels: 0,
        cost: Default::default(),
        scheduler_config: SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler"}"#).expect("config"),
        default_scheduler: SchedulerKind::Pndm,
        prediction: Prediction::Epsilon,
        text_layers: 12,
        text_model_id: "fuzz@1".into(),
        family: Default::default(),
    };
    if let Err(e) = Plan::new(req, &facts, &Limits::default()) {
        assert!(matches!(e, Error::Invalid { .. } | Error::UnknownModel { .. }), "{e:?}");
        assert!(tonic::Status::from(e).message().len() < 1024, "a short message");
    }
});
