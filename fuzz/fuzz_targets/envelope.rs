//! Envelopes as the ledger stores and JetStream carries them: decoding, hashing (canonical
//! JSON), and decoding the event with upcasting. Any bytes: `Ok` or a typed error, never a panic.
#![no_main]

use backstop_events::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(data) else {
        return;
    };
    let _ = envelope.compute_hash();
    let _ = envelope.event();
    let _ = envelope.as_new_event().validate();
});
