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

fuzz_target!(|data: &[u8]| {
    let Ok(req) = GenerateRequest::decode(data) else { return };
    let facts = ModelFacts::sd15_example();
    if let Err(e) = Plan::new(req, &facts, &Limits::default()) {
        assert!(matches!(e, Error::Invalid { .. } | Error::UnknownModel { .. }), "{e:?}");
        assert!(tonic::Status::from(e).message().len() < 1024, "a short message");
    }
});
