//! Any bytes as an HTTP request body, to the OpenAI and AUTOMATIC1111
//! parsers: requests or a 4xx naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_gateway::http::{a1111, error::HttpError, openai};

fn check(e: Option<HttpError>) {
    if let Some(e) = e {
        assert!(e.status.is_client_error(), "{e:?}");
        assert!(!e.message.is_empty() && e.message.len() < 1024, "{e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check(openai::parse(data).err());
    check(a1111::parse(data, false).err());
    check(a1111::parse(data, true).err());
});
