//! Any bytes as an init image: an image or INVALID_ARGUMENT, never a panic,
//! a hang or an allocation beyond the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_gateway::error::Error;
use sd_gateway::limits::Limits;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    for target in [None, Some((64, 48))] {
        if let Err(e) = sd_gateway::images::decode_init_image(data, &limits, 8, target) {
            assert!(matches!(e, Error::Invalid { field: "init_image", .. }), "{e:?}");
        }
    }
});
