//! Arbitrary text as a client's WebSocket message: decoding, the range check, the pong and the
//! error reply must never panic, and every error must encode to JSON with its code.
#![no_main]

use conductor::protocol;
use conductor::tempo::Bpm;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let result = protocol::decode(text).and_then(|m| match m {
        protocol::ClientMessage::SetBpm(v) => {
            protocol::check_bpm(v, Bpm::whole(60), Bpm::whole(200)).map(|_| ())
        }
        protocol::ClientMessage::Ping(t0) => {
            // Whatever number came in must echo back as valid JSON.
            let reply = protocol::pong(t0, 1, 2).json();
            assert!(
                serde_json::from_str::<serde_json::Value>(&reply).is_ok(),
                "{reply}"
            );
            Ok(())
        }
        protocol::ClientMessage::Start(_) | protocol::ClientMessage::Stop => Ok(()),
    });
    if let Err(err) = result {
        let reply = protocol::error(&err).json();
        assert!(reply.contains(err.code()));
        assert!(
            reply.len() < 512,
            "error replies stay short: {}",
            reply.len()
        );
        let frame = protocol::text_frame(&reply);
        assert_eq!(frame[0], 0x81);
    }
});
