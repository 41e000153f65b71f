//! Arbitrary text through every Engine.IO / Socket.IO parser: the `/socket.io/` query, a polling
//! payload, each Engine.IO packet and the Socket.IO packet inside it. None may panic, and what
//! the server would echo back (a connect error, an error event) must stay valid JSON.
#![no_main]

use conductor::engineio::{self, Packet, SioPacket};
use conductor::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = engineio::parse_query(text) {
        assert!(serde_json::from_str::<serde_json::Value>(&e.body()).is_ok());
    }
    for packet in engineio::split_payload(text) {
        let Ok(Packet::Message(message)) = engineio::decode_packet(packet) else {
            continue;
        };
        match engineio::decode_sio(message) {
            Ok(SioPacket::Connect { nsp, .. }) => {
                let reply = engineio::connect_error(&nsp, "Invalid namespace");
                let json = reply.trim_start_matches("44").splitn(2, ',').last().unwrap_or("");
                let json = if nsp == "/" { reply.trim_start_matches("44") } else { json };
                assert!(serde_json::from_str::<serde_json::Value>(json).is_ok(), "{reply}");
            }
            Ok(SioPacket::Event { name, data, .. }) => {
                if let Err(err) = protocol::decode_event(&name, data.as_ref()) {
                    let reply = protocol::error(&err);
                    let packet = engineio::event(reply.name, &reply.data);
                    assert!(serde_json::from_str::<serde_json::Value>(&packet[2..]).is_ok());
                }
            }
            Ok(_) => {}
            Err(e) => {
                let err = protocol::ClientError::BadPacket(e.to_string());
                assert!(protocol::error(&err).json().len() < 512);
            }
        }
    }
});
