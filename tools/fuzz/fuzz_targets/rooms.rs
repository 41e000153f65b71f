//! Arbitrary bytes where the network names a room, chooses its ticks or answers a ping: the
//! `room=` and `ticks=` query parameters, a Socket.IO namespace and its CONNECT's auth, a
//! WebSocket Pong's payload. Parsing must never panic, an accepted name must obey the rule, a
//! tick choice is one of the four (and says so when refused, briefly), and a round trip read
//! from a Pong must be within bounds.
#![no_main]

use conductor::engineio::{self, SioPacket};
use conductor::http;
use conductor::lead;
use conductor::room::{self, RoomName};
use conductor::tick_choice::{Audience, TickChoice};
use libfuzzer_sys::fuzz_target;

fn check_name(name: &str) {
    if let Ok(parsed) = RoomName::parse(name) {
        let s = parsed.as_str();
        assert!((1..=room::MAX_NAME).contains(&s.len()), "{s:?}");
        assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'));
        // Safe verbatim in a namespace and a Prometheus label.
        let packet = engineio::event_in(&format!("/{s}"), "tick", "1");
        assert!(packet.starts_with("42/"));
    } else if let Err(e) = RoomName::parse(name) {
        assert!(e.to_string().len() < 256, "refusals stay short");
    }
}

fn check_ticks(choice: Result<Option<TickChoice>, conductor::tick_choice::TicksError>) {
    match choice {
        Ok(Some(c)) => {
            assert_eq!(TickChoice::parse(c.label()), Ok(c));
            // A choice never takes more than every tick.
            assert!(Audience::EVERYONE.includes(c));
        }
        Ok(None) => {}
        Err(e) => assert!(e.to_string().len() < 128, "refusals stay short: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // As a Pong payload: only our own 8-byte stamps yield a round trip, never a huge one.
    if let Some(rtt) = lead::rtt_from_pong(data, 5_000_000_000, 30_000_000_000) {
        assert_eq!(data.len(), 8);
        assert!(rtt <= 30_000_000_000);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As a query string.
    if let Some(name) = http::query_param(text, "room") {
        check_name(&name);
    }
    check_ticks(TickChoice::from_param(http::query_param(text, "ticks").as_deref()));
    // As a Socket.IO packet: a connect names its namespace, the room.
    if let Ok(SioPacket::Connect { auth, .. }) = engineio::decode_sio(text) {
        check_ticks(TickChoice::from_auth(auth.as_ref()));
    }
    if let Ok(SioPacket::Connect { nsp, .. }) = engineio::decode_sio(text)
        && let Some(name) = nsp.strip_prefix('/')
    {
        check_name(name);
        let refused = engineio::connect_error_with(&nsp, "Invalid namespace", "invalid_room", name);
        assert!(refused.starts_with("44"));
    }
    check_name(text);
});
