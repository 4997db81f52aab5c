//! Remote append requests (`backstop.ledger.append` and the control socket): the request
//! decoding of `backstop_ledger::requests::answer_bytes`, then the checks of every event in it.
#![no_main]

use backstop_ledger::requests::AppendRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<AppendRequest>(data) else {
        return;
    };
    for event in &request.events {
        let _ = event.validate();
    }
});
