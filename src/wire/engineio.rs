//! Engine.IO v4 and Socket.IO v5, as far as the predecessor's clients use them.
//!
//! This module owns the bytes of both layers: the `/socket.io/` query, Engine.IO packets (`0`
//! open … `6` noop), the long-polling payload (packets joined by `\x1e`), and the Socket.IO
//! packets inside Engine.IO messages (`40` connect, `42["event",data]`, `44` connect error). It
//! is pure, like [`crate::protocol`]: no sockets, no clocks, no sessions. Which session a packet
//! belongs to and what it makes the server do is the event loop's business.
//!
//! Only the default namespace `/` exists, and binary packets are refused: the protocol carries
//! JSON only.

use serde_json::{Value, json};
use thiserror::Error;

/// Separates packets in a long-polling payload (Engine.IO v4).
pub const SEPARATOR: char = '\x1e';

/// Which Engine.IO transport a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Polling,
    WebSocket,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Polling => "polling",
            Transport::WebSocket => "websocket",
        }
    }
}

/// The Engine.IO part of a `/socket.io/` query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EioQuery {
    pub transport: Transport,
    /// The session, for every request after the handshake.
    pub sid: Option<String>,
}

/// Engine.IO's HTTP-level errors, each with the code and message its clients know. Sent as
/// `400` (or `403`) with `{"code":N,"message":"..."}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum EioError {
    #[error("Transport unknown")]
    TransportUnknown,
    #[error("Session ID unknown")]
    SessionIdUnknown,
    #[error("Bad handshake method")]
    BadHandshakeMethod,
    #[error("Bad request")]
    BadRequest,
    #[error("Forbidden")]
    Forbidden,
    #[error("Unsupported protocol version")]
    UnsupportedProtocolVersion,
}

impl EioError {
    /// Engine.IO's numeric error code.
    pub fn code(self) -> u8 {
        match self {
            EioError::TransportUnknown => 0,
            EioError::SessionIdUnknown => 1,
            EioError::BadHandshakeMethod => 2,
            EioError::BadRequest => 3,
            EioError::Forbidden => 4,
            EioError::UnsupportedProtocolVersion => 5,
        }
    }

    pub fn status(self) -> u16 {
        match self {
            EioError::Forbidden => 403,
            _ => 400,
        }
    }

    /// The response body stock clients parse.
    pub fn body(self) -> String {
        error_body(self, &self.to_string())
    }
}

/// Engine.IO's JSON error with a message of our own: what exactly was wrong.
pub fn error_body(e: EioError, message: &str) -> String {
    json!({ "code": e.code(), "message": message }).to_string()
}

/// Reads `EIO`, `transport` and `sid` from a query string. Only version 4 is spoken.
pub fn parse_query(query: &str) -> Result<EioQuery, EioError> {
    let mut eio = None;
    let mut transport = None;
    let mut sid = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "EIO" => eio = Some(value),
            "transport" => transport = Some(value),
            "sid" => sid = Some(value),
            _ => {}
        }
    }
    if eio != Some("4") {
        return Err(EioError::UnsupportedProtocolVersion);
    }
    let transport = match transport {
        Some("polling") => Transport::Polling,
        Some("websocket") => Transport::WebSocket,
        _ => return Err(EioError::TransportUnknown),
    };
    let sid = match sid {
        None | Some("") => None,
        // Our ids are lowercase hex; anything else cannot name a session.
        Some(s) if s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            Some(s.to_string())
        }
        Some(_) => return Err(EioError::SessionIdUnknown),
    };
    Ok(EioQuery { transport, sid })
}

/// The Engine.IO open packet: `0{"sid":...,"upgrades":[...],...}`.
pub fn open_packet(
    sid: &str,
    upgrades: &[&str],
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    max_payload: usize,
) -> String {
    let body = json!({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": ping_interval_ms,
        "pingTimeout": ping_timeout_ms,
        "maxPayload": max_payload,
    });
    format!("0{body}")
}

/// One Engine.IO packet from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Close,
    Ping(&'a str),
    Pong(&'a str),
    /// A message: for us, always a Socket.IO packet.
    Message(&'a str),
    Upgrade,
    Noop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("empty Engine.IO packet")]
    Empty,
    #[error("Engine.IO packet type {0:?} is not one a client sends")]
    BadType(char),
    #[error("binary Engine.IO packets are not supported; this server speaks JSON only")]
    Binary,
}

/// Decodes one Engine.IO packet (a WebSocket text frame, or one part of a polling payload).
pub fn decode_packet(text: &str) -> Result<Packet<'_>, PacketError> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or(PacketError::Empty)?;
    let rest = chars.as_str();
    match kind {
        '1' => Ok(Packet::Close),
        '2' => Ok(Packet::Ping(rest)),
        '3' => Ok(Packet::Pong(rest)),
        '4' => Ok(Packet::Message(rest)),
        '5' => Ok(Packet::Upgrade),
        '6' => Ok(Packet::Noop),
        // In a polling payload, `b` starts a base64 binary packet.
        'b' => Err(PacketError::Binary),
        other => Err(PacketError::BadType(other)),
    }
}

/// The packets of a polling POST body.
pub fn split_payload(body: &str) -> impl Iterator<Item = &str> {
    body.split(SEPARATOR)
}

/// One Socket.IO packet from a client, inside an Engine.IO message.
#[derive(Clone, Debug, PartialEq)]
pub enum SioPacket {
    /// `0[/nsp,][{auth}]`.
    Connect { nsp: String, auth: Option<Value> },
    /// `1[/nsp,]`.
    Disconnect { nsp: String },
    /// `2[/nsp,][ack]["name",data...]`: the event's name and its first argument, and the id
    /// to acknowledge it with when the client passed a callback.
    Event {
        nsp: String,
        name: String,
        data: Option<Value>,
        ack: Option<u64>,
    },
    /// An acknowledgement of something we sent; we ask for none, so it is ignored.
    Ack,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SioError {
    #[error("empty Socket.IO packet")]
    Empty,
    #[error("Socket.IO packet type {0:?} is not one a client sends")]
    BadType(char),
    #[error("binary Socket.IO packets are not supported; send JSON")]
    Binary,
    #[error("Socket.IO packet payload is not valid JSON")]
    BadJson,
    #[error("a Socket.IO event must be an array whose first element is the event name")]
    BadEvent,
}

/// Decodes a Socket.IO packet: `<type>[<attachments>-][<nsp>,][<ack id>][<JSON>]`.
pub fn decode_sio(text: &str) -> Result<SioPacket, SioError> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or(SioError::Empty)?;
    let mut rest = chars.as_str();
    match kind {
        '0' | '1' | '2' | '3' => {}
        '5' | '6' => return Err(SioError::Binary),
        other => return Err(SioError::BadType(other)),
    }
    let mut nsp = "/";
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        nsp = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    // An id too long for u64 is no id a client could match; such an event gets no ack.
    let ack = rest[..digits].parse::<u64>().ok();
    rest = &rest[digits..];
    let payload = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<Value>(rest).map_err(|_| SioError::BadJson)?)
    };
    let nsp = nsp.to_string();
    match kind {
        '0' => Ok(SioPacket::Connect { nsp, auth: payload }),
        '1' => Ok(SioPacket::Disconnect { nsp }),
        '3' => Ok(SioPacket::Ack),
        _ => {
            let Some(Value::Array(mut args)) = payload else {
                return Err(SioError::BadEvent);
            };
            if args.is_empty() {
                return Err(SioError::BadEvent);
            }
            let data = (args.len() > 1).then(|| args.swap_remove(1));
            let Value::String(name) = args.swap_remove(0) else {
                return Err(SioError::BadEvent);
            };
            Ok(SioPacket::Event {
                nsp,
                name,
                data,
                ack,
            })
        }
    }
}

/// The answer to a namespace connect: `40{"sid":...}` as an Engine.IO message.
pub fn connect_ok(sid: &str) -> String {
    format!("40{}", json!({ "sid": sid }))
}

/// A refused namespace connect, which a stock client reports as `connect_error`.
pub fn connect_error(nsp: &str, message: &str) -> String {
    let prefix = if nsp == "/" {
        String::new()
    } else {
        format!("{nsp},")
    };
    format!("44{prefix}{}", json!({ "message": message }))
}

/// An acknowledgement of event `id` with one argument, as an Engine.IO message:
/// `43<id>[<arg>]`, `arg` already JSON.
pub fn ack(id: u64, arg_json: &str) -> String {
    format!("43{id}[{arg_json}]")
}

/// An event as an Engine.IO message: `42["name",data]`, with `data` already JSON.
pub fn event(name: &str, data_json: &str) -> String {
    // Event names are our own constants; serde_json quotes them correctly all the same.
    let name = Value::from(name);
    format!("42[{name},{data_json}]")
}

/// The `NSP,` that starts a packet for namespace `nsp` (nothing for the default `/`).
fn nsp_prefix(nsp: &str) -> String {
    if nsp == "/" {
        String::new()
    } else {
        format!("{nsp},")
    }
}

/// An event in namespace `nsp`: `42/nsp,["name",data]` (`42[...]` in `/`).
pub fn event_in(nsp: &str, name: &str, data_json: &str) -> String {
    let name = Value::from(name);
    format!("42{}[{name},{data_json}]", nsp_prefix(nsp))
}

/// The answer to a connect to namespace `nsp`: `40/nsp,{"sid":...}`.
pub fn connect_ok_in(nsp: &str, sid: &str) -> String {
    format!("40{}{}", nsp_prefix(nsp), json!({ "sid": sid }))
}

/// A refused connect to `nsp` whose reason a stock client finds in `err.data`:
/// `44/nsp,{"message":...,"data":{"code":...,"message":...}}`.
pub fn connect_error_with(nsp: &str, message: &str, code: &str, detail: &str) -> String {
    let body = json!({ "message": message, "data": { "code": code, "message": detail } });
    format!("44{}{body}", nsp_prefix(nsp))
}

/// An acknowledgement in namespace `nsp`: `43/nsp,<id>[<arg>]`.
pub fn ack_in(nsp: &str, id: u64, arg_json: &str) -> String {
    format!("43{}{id}[{arg_json}]", nsp_prefix(nsp))
}

/// A fresh session id: 16 random bytes from the kernel, as hex. A session id is what lets a
/// long-polling client post as itself (control rights included), so it must not be guessable:
/// when the kernel cannot give randomness, there is no session rather than a predictable one.
pub fn new_sid() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_needs_version_4_and_a_known_transport() {
        assert_eq!(
            parse_query("EIO=4&transport=polling&t=NxyZ"),
            Ok(EioQuery {
                transport: Transport::Polling,
                sid: None
            })
        );
        assert_eq!(
            parse_query("EIO=4&transport=websocket&sid=ab12"),
            Ok(EioQuery {
                transport: Transport::WebSocket,
                sid: Some("ab12".into())
            })
        );
        assert_eq!(
            parse_query("EIO=3&transport=polling"),
            Err(EioError::UnsupportedProtocolVersion)
        );
        assert_eq!(
            parse_query("transport=polling"),
            Err(EioError::UnsupportedProtocolVersion)
        );
        assert_eq!(
            parse_query("EIO=4&transport=flash"),
            Err(EioError::TransportUnknown)
        );
        assert_eq!(parse_query("EIO=4"), Err(EioError::TransportUnknown));
        assert_eq!(
            parse_query("EIO=4&transport=polling&sid=../x"),
            Err(EioError::SessionIdUnknown)
        );
    }

    #[test]
    fn errors_have_engine_io_codes() {
        assert_eq!(
            EioError::SessionIdUnknown.body(),
            r#"{"code":1,"message":"Session ID unknown"}"#
        );
        assert_eq!(EioError::Forbidden.status(), 403);
        assert_eq!(EioError::TransportUnknown.code(), 0);
    }

    #[test]
    fn open_packet_shape() {
        let p = open_packet("abc", &["websocket"], 25_000, 20_000, 4096);
        assert!(p.starts_with('0'));
        let v: Value = serde_json::from_str(&p[1..]).unwrap();
        assert_eq!(v["sid"], "abc");
        assert_eq!(v["upgrades"][0], "websocket");
        assert_eq!(v["pingInterval"], 25_000);
        assert_eq!(v["pingTimeout"], 20_000);
        assert_eq!(v["maxPayload"], 4096);
    }

    #[test]
    fn engine_io_packets() {
        assert_eq!(decode_packet("2probe"), Ok(Packet::Ping("probe")));
        assert_eq!(decode_packet("3"), Ok(Packet::Pong("")));
        assert_eq!(decode_packet("40"), Ok(Packet::Message("0")));
        assert_eq!(decode_packet("5"), Ok(Packet::Upgrade));
        assert_eq!(decode_packet("6"), Ok(Packet::Noop));
        assert_eq!(decode_packet("1"), Ok(Packet::Close));
        assert_eq!(decode_packet(""), Err(PacketError::Empty));
        assert_eq!(decode_packet("0{}"), Err(PacketError::BadType('0')));
        assert_eq!(decode_packet("9"), Err(PacketError::BadType('9')));
        assert_eq!(decode_packet("bAQID"), Err(PacketError::Binary));
        let body = "3\x1e42[\"setBpm\",140]";
        assert_eq!(
            split_payload(body).collect::<Vec<_>>(),
            ["3", "42[\"setBpm\",140]"]
        );
    }

    #[test]
    fn socket_io_packets() {
        assert_eq!(
            decode_sio("0"),
            Ok(SioPacket::Connect {
                nsp: "/".into(),
                auth: None
            })
        );
        assert_eq!(
            decode_sio(r#"0{"token":"t"}"#),
            Ok(SioPacket::Connect {
                nsp: "/".into(),
                auth: Some(json!({"token": "t"}))
            })
        );
        assert_eq!(
            decode_sio("0/admin,"),
            Ok(SioPacket::Connect {
                nsp: "/admin".into(),
                auth: None
            })
        );
        assert_eq!(
            decode_sio(r#"2["setBpm",140]"#),
            Ok(SioPacket::Event {
                nsp: "/".into(),
                name: "setBpm".into(),
                data: Some(json!(140)),
                ack: None
            })
        );
        // With an ack id, and without data.
        assert_eq!(
            decode_sio(r#"212["stop"]"#),
            Ok(SioPacket::Event {
                nsp: "/".into(),
                name: "stop".into(),
                data: None,
                ack: Some(12)
            })
        );
        assert_eq!(
            decode_sio("1"),
            Ok(SioPacket::Disconnect { nsp: "/".into() })
        );
        assert_eq!(decode_sio("3[]"), Ok(SioPacket::Ack));
        for (bad, err) in [
            ("", SioError::Empty),
            ("7", SioError::BadType('7')),
            ("51-[\"x\",{}]", SioError::Binary),
            ("2[", SioError::BadJson),
            ("2{}", SioError::BadEvent),
            ("2[]", SioError::BadEvent),
            ("2[5]", SioError::BadEvent),
            ("2", SioError::BadEvent),
        ] {
            assert_eq!(decode_sio(bad), Err(err), "{bad:?}");
        }
    }

    #[test]
    fn encodes_what_clients_expect() {
        assert_eq!(connect_ok("s1"), r#"40{"sid":"s1"}"#);
        assert_eq!(
            connect_error("/", "Invalid namespace"),
            r#"44{"message":"Invalid namespace"}"#
        );
        assert_eq!(
            connect_error("/admin", "Invalid namespace"),
            r#"44/admin,{"message":"Invalid namespace"}"#
        );
        assert_eq!(event("bpmChange", "140"), r#"42["bpmChange",140]"#);
        assert_eq!(event_in("/", "tick", "1"), r#"42["tick",1]"#);
        assert_eq!(event_in("/band", "tick", "1"), r#"42/band,["tick",1]"#);
        assert_eq!(connect_ok_in("/", "s1"), connect_ok("s1"));
        assert_eq!(connect_ok_in("/band", "s1"), r#"40/band,{"sid":"s1"}"#);
        assert_eq!(ack_in("/band", 3, "{}"), "43/band,3[{}]");
        assert_eq!(ack_in("/", 3, "{}"), ack(3, "{}"));
        let refused =
            connect_error_with("/b", "Invalid namespace", "one_room_per_connection", "why");
        assert!(refused.starts_with("44/b,{"), "{refused}");
        let v: Value = serde_json::from_str(&refused["44/b,".len()..]).unwrap();
        assert_eq!(v["message"], "Invalid namespace");
        assert_eq!(v["data"]["code"], "one_room_per_connection");
        assert_eq!(ack(7, r#"{"ok":true}"#), r#"437[{"ok":true}]"#);
    }

    #[test]
    fn session_ids_are_random_hex() {
        let (a, b) = (new_sid().unwrap(), new_sid().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
