//! The wire protocol: JSON messages `{"event": NAME, "data": ...}` in WebSocket text frames.
//!
//! This module owns what the bytes mean, both ways, and the encoding of server frames. It is
//! pure: it knows nothing of sockets, connections or clocks (times come in as arguments). The
//! seed's messages (`tick`, `bpmChange`, `setBpm`) keep their exact shapes; everything added
//! (`hello`, `timeline`, `transport`, `pong`, `error`, the extra tick fields) is additive, so the
//! predecessor's clients keep working: they ignore events they do not know.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::tempo::Bpm;
use crate::transport::{Quantize, TransportState};

/// An encoded server frame, shared by every connection it is sent to.
pub type SharedFrame = Arc<[u8]>;

/// Encodes `payload` as one unmasked, final WebSocket text frame. Server frames carry no mask,
/// so the same bytes are valid on every connection.
pub fn text_frame(payload: &str) -> SharedFrame {
    let frame = Frame::message(payload.as_bytes().to_vec(), OpCode::Data(Data::Text), true);
    let mut bytes = Vec::with_capacity(frame.len());
    // Formatting into a Vec cannot fail: the only error source is the writer.
    if frame.format(&mut bytes).is_err() {
        bytes.clear();
    }
    bytes.into()
}

/// A server event, its data already JSON: encoded once, then framed once per protocol that
/// needs it (this module's envelope for `/ws`, `42[...]` for Socket.IO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub name: &'static str,
    pub data: String,
}

impl Outgoing {
    /// `{"event":NAME,"data":DATA}`, as `/ws` clients get it.
    pub fn json(&self) -> String {
        format!(r#"{{"event":"{}","data":{}}}"#, self.name, self.data)
    }

    /// The `/ws` frame.
    pub fn frame(&self) -> SharedFrame {
        text_frame(&self.json())
    }
}

fn envelope<T: Serialize>(name: &'static str, data: T) -> Outgoing {
    // Serialising these plain structs cannot fail (no maps with non-string keys, no I/O).
    Outgoing {
        name,
        data: serde_json::to_string(&data).unwrap_or_else(|_| "null".into()),
    }
}

/// The fields of a `tick`. The first three are the seed's, in the seed's order.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TickData {
    /// The tick's scheduled instant, unix milliseconds (rounded down).
    pub time: u64,
    pub bpm: Bpm,
    pub count: u64,
    /// The same instant in unix microseconds.
    pub time_us: u64,
    pub ppqn: u32,
}

impl TickData {
    pub fn new(scheduled_unix_ns: u64, bpm: Bpm, count: u64, ppqn: u32) -> TickData {
        TickData {
            time: scheduled_unix_ns / 1_000_000,
            bpm,
            count,
            time_us: scheduled_unix_ns / 1_000,
            ppqn,
        }
    }
}

pub fn tick(data: &TickData) -> Outgoing {
    envelope("tick", data)
}

/// `{"event":"bpmChange","data":140}`: the seed's shape, data the bare number.
pub fn bpm_change(bpm: Bpm) -> Outgoing {
    envelope("bpmChange", bpm)
}

/// What a client learns on connect.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct HelloData {
    pub bpm: Bpm,
    pub ppqn: u32,
    /// The last tick emitted (0 before the first).
    pub count: u64,
    /// Server wall time when the hello was written, unix ms and µs.
    pub time: u64,
    pub time_us: u64,
    pub min_bpm: Bpm,
    pub max_bpm: Bpm,
    pub beats_per_bar: u32,
    /// Whether the transport is playing (or about to start).
    pub playing: bool,
    /// Whether this connection may change the tempo.
    pub control: bool,
    /// Whether the server asks for a control token at all.
    pub token_required: bool,
    pub version: &'static str,
}

pub fn hello(data: &HelloData) -> Outgoing {
    envelope("hello", data)
}

/// Unix nanoseconds as milliseconds with a microsecond fraction: precise enough for clock sync,
/// and a plain JSON number every client can read.
fn unix_ms(unix_ns: u64) -> f64 {
    (unix_ns / 1_000) as f64 / 1_000.0
}

#[derive(Serialize)]
struct PongData {
    t0: f64,
    t1: f64,
    t2: f64,
}

/// The answer to a clock-sync ping: the client's `t0` back, with the server's receive (`t1`)
/// and send (`t2`) times, so the client can apply NTP's offset and delay formulas.
pub fn pong(t0: f64, received_unix_ns: u64, sent_unix_ns: u64) -> Outgoing {
    envelope(
        "pong",
        PongData {
            t0,
            t1: unix_ms(received_unix_ns),
            t2: unix_ms(sent_unix_ns),
        },
    )
}

/// A transport state and the tick it holds from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TransportData {
    pub state: &'static str,
    /// The first tick in this state.
    pub count: u64,
    /// That tick's scheduled instant, unix µs and ms.
    pub time_us: u64,
    pub time: u64,
}

impl TransportData {
    pub fn new(state: TransportState, count: u64, unix_ns: u64) -> TransportData {
        TransportData {
            state: state.label(),
            count,
            time_us: unix_ns / 1_000,
            time: unix_ns / 1_000_000,
        }
    }
}

pub fn transport(data: &TransportData) -> Outgoing {
    envelope("transport", data)
}

/// Everything a client needs to compute every future tick's instant without waiting for it:
/// tick `n >= count` is due at `time_us + (n − count) · 60e6 / (bpm · ppqn)` µs, server unix
/// time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TimelineData {
    /// The anchor: the first tick at this tempo.
    pub count: u64,
    /// The anchor's scheduled instant, unix µs and ms.
    pub time_us: u64,
    pub time: u64,
    pub bpm: Bpm,
    pub ppqn: u32,
    pub beats_per_bar: u32,
    /// The exact interval between ticks, µs (fractional).
    pub interval_us: f64,
    pub transport: TransportData,
}

pub fn timeline(data: &TimelineData) -> Outgoing {
    envelope("timeline", data)
}

#[derive(Serialize)]
struct ErrorData<'a> {
    code: &'a str,
    message: &'a str,
}

/// `{"event":"error","data":{"code":...,"message":...}}`.
pub fn error(err: &ClientError) -> Outgoing {
    envelope(
        "error",
        ErrorData {
            code: err.code(),
            message: &err.to_string(),
        },
    )
}

/// A request from a client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientMessage {
    /// `{"event":"setBpm","data":140}`: the value as sent, not yet range-checked.
    SetBpm(f64),
    /// `{"event":"ping","data":{"t0":...}}`: a clock-sync probe; `t0` is echoed back.
    Ping(f64),
    /// `{"event":"start"}`, optionally `"data":{"quantize":"bar"|"beat"|"none"}`.
    Start(Quantize),
    /// `{"event":"stop"}`.
    Stop,
}

/// Why a client's message was refused. Each is answered with an `error` event; none closes the
/// connection.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum ClientError {
    #[error("message is not valid JSON ({0}); send {{\"event\":NAME,\"data\":...}}")]
    InvalidJson(String),
    #[error("message must be a JSON object with a string \"event\" field")]
    NotAnEvent,
    #[error("unknown event {0:?}; this server understands: setBpm, start, stop, ping")]
    UnknownEvent(String),
    #[error("setBpm needs a number as data, e.g. {{\"event\":\"setBpm\",\"data\":140}}")]
    NotANumber,
    #[error("bpm {value} is out of range; choose {min} to {max}")]
    OutOfRange { value: f64, min: Bpm, max: Bpm },
    #[error("ping needs a number t0, e.g. {{\"event\":\"ping\",\"data\":{{\"t0\":12.5}}}}")]
    BadPing,
    #[error("start's quantize must be \"bar\", \"beat\" or \"none\"")]
    BadQuantize,
    /// What is wrong with the cluster's Redis, completing "the cluster's Redis …" (see
    /// `ClusterFault::describe`).
    #[error(
        "the cluster's Redis {0}: tempo and transport stay as they are until it is fixed (ticks go on)"
    )]
    ClusterUnavailable(&'static str),
    #[error("malformed Socket.IO packet: {0}")]
    BadPacket(String),
    #[error("binary frames are not part of this protocol; send JSON text frames")]
    Binary,
    #[error("tempo changes are coming faster than the server applies them; try again shortly")]
    Busy,
    #[error("more than {0} messages a second; messages are being dropped, slow down")]
    RateLimited(u32),
    #[error(
        "this server requires a control token to change the tempo or transport; connect with ?token="
    )]
    Unauthorized,
}

impl ClientError {
    /// The stable, machine-readable code clients can switch on.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::InvalidJson(_) => "invalid_json",
            ClientError::NotAnEvent => "invalid_message",
            ClientError::UnknownEvent(_) => "unknown_event",
            ClientError::NotANumber => "invalid_bpm",
            ClientError::OutOfRange { .. } => "bpm_out_of_range",
            ClientError::BadPing => "invalid_ping",
            ClientError::BadQuantize => "invalid_quantize",
            ClientError::BadPacket(_) => "invalid_packet",
            ClientError::ClusterUnavailable(_) => "cluster_unavailable",
            ClientError::Binary => "binary_unsupported",
            ClientError::Busy => "busy",
            ClientError::RateLimited(_) => "rate_limited",
            ClientError::Unauthorized => "unauthorized",
        }
    }
}

/// Parses one text message from a client.
pub fn decode(text: &str) -> Result<ClientMessage, ClientError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ClientError::InvalidJson(clip(&e.to_string(), 80)))?;
    let Value::Object(mut fields) = value else {
        return Err(ClientError::NotAnEvent);
    };
    let Some(Value::String(event)) = fields.remove("event") else {
        return Err(ClientError::NotAnEvent);
    };
    decode_event(&event, fields.get("data"))
}

/// Interprets an event by name and data, however it arrived (`/ws` envelope or Socket.IO
/// `42["name",data]`): the same rules for both protocols.
pub fn decode_event(event: &str, data: Option<&Value>) -> Result<ClientMessage, ClientError> {
    match event {
        "setBpm" => match data.and_then(Value::as_f64) {
            Some(bpm) => Ok(ClientMessage::SetBpm(bpm)),
            None => Err(ClientError::NotANumber),
        },
        "ping" => match data.and_then(|d| d.get("t0")).and_then(Value::as_f64) {
            Some(t0) => Ok(ClientMessage::Ping(t0)),
            None => Err(ClientError::BadPing),
        },
        "start" => match data {
            None | Some(Value::Null) => Ok(ClientMessage::Start(Quantize::Bar)),
            Some(data) => match data.get("quantize") {
                None | Some(Value::Null) => Ok(ClientMessage::Start(Quantize::Bar)),
                Some(Value::String(q)) => Quantize::parse(q)
                    .map(ClientMessage::Start)
                    .ok_or(ClientError::BadQuantize),
                Some(_) => Err(ClientError::BadQuantize),
            },
        },
        "stop" => Ok(ClientMessage::Stop),
        _ => Err(ClientError::UnknownEvent(clip(event, 40))),
    }
}

/// At most `chars` characters of `text`: echoing untrusted text back must stay short, and
/// cutting by bytes could split a character.
fn clip(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

/// The tempo `value` asks for, if it lies within `[min, max]`.
pub fn check_bpm(value: f64, min: Bpm, max: Bpm) -> Result<Bpm, ClientError> {
    match Bpm::from_f64(value) {
        Some(bpm) if bpm >= min && bpm <= max => Ok(bpm),
        _ => Err(ClientError::OutOfRange { value, min, max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_has_the_seed_shape_first() {
        let data = TickData::new(1_640_995_200_000_123_456, Bpm::whole(120), 1234, 4);
        assert_eq!(
            tick(&data).json(),
            r#"{"event":"tick","data":{"time":1640995200000,"bpm":120,"count":1234,"time_us":1640995200000123,"ppqn":4}}"#
        );
    }

    #[test]
    fn bpm_change_data_is_the_bare_number() {
        assert_eq!(
            bpm_change(Bpm::whole(140)).json(),
            r#"{"event":"bpmChange","data":140}"#
        );
        assert_eq!(
            bpm_change(Bpm::from_f64(92.5).unwrap()).json(),
            r#"{"event":"bpmChange","data":92.5}"#
        );
    }

    #[test]
    fn error_carries_code_and_message() {
        let v: Value = serde_json::from_str(&error(&ClientError::NotANumber).json()).unwrap();
        assert_eq!(v["event"], "error");
        assert_eq!(v["data"]["code"], "invalid_bpm");
        assert!(v["data"]["message"].as_str().unwrap().contains("setBpm"));
    }

    #[test]
    fn decodes_set_bpm() {
        assert_eq!(
            decode(r#"{"event":"setBpm","data":140}"#),
            Ok(ClientMessage::SetBpm(140.0))
        );
        assert_eq!(
            decode(r#"{"data":92.5,"event":"setBpm","extra":true}"#),
            Ok(ClientMessage::SetBpm(92.5))
        );
    }

    #[test]
    fn decodes_ping_start_and_stop() {
        assert_eq!(
            decode(r#"{"event":"ping","data":{"t0":1234.5}}"#),
            Ok(ClientMessage::Ping(1234.5))
        );
        assert_eq!(
            decode(r#"{"event":"start"}"#),
            Ok(ClientMessage::Start(Quantize::Bar))
        );
        assert_eq!(
            decode(r#"{"event":"start","data":{"quantize":"none"}}"#),
            Ok(ClientMessage::Start(Quantize::None))
        );
        assert_eq!(
            decode(r#"{"event":"start","data":{}}"#),
            Ok(ClientMessage::Start(Quantize::Bar))
        );
        assert_eq!(decode(r#"{"event":"stop"}"#), Ok(ClientMessage::Stop));
    }

    #[test]
    fn pong_echoes_t0_and_stamps_microseconds() {
        let v: Value = serde_json::from_str(
            &pong(17.25, 1_700_000_000_123_456_789, 1_700_000_000_124_000_000).json(),
        )
        .unwrap();
        assert_eq!(v["event"], "pong");
        assert_eq!(v["data"]["t0"], 17.25);
        assert_eq!(v["data"]["t1"], 1_700_000_000_123.456);
        assert_eq!(v["data"]["t2"], 1_700_000_000_124.0);
    }

    #[test]
    fn timeline_and_transport_shapes() {
        let transport_data =
            TransportData::new(TransportState::Playing, 32, 1_700_000_000_500_000_000);
        let t = TimelineData {
            count: 16,
            time_us: 1_700_000_000_000_000,
            time: 1_700_000_000_000,
            bpm: Bpm::whole(120),
            ppqn: 4,
            beats_per_bar: 4,
            interval_us: 125_000.0,
            transport: transport_data,
        };
        let v: Value = serde_json::from_str(&timeline(&t).json()).unwrap();
        assert_eq!(v["event"], "timeline");
        assert_eq!(v["data"]["count"], 16);
        assert_eq!(v["data"]["bpm"], 120);
        assert_eq!(v["data"]["interval_us"], 125_000.0);
        assert_eq!(v["data"]["transport"]["state"], "playing");
        assert_eq!(v["data"]["transport"]["time_us"], 1_700_000_000_500_000u64);
        let v: Value = serde_json::from_str(&transport(&transport_data).json()).unwrap();
        assert_eq!(v["event"], "transport");
        assert_eq!(v["data"]["count"], 32);
        assert_eq!(v["data"]["time"], 1_700_000_000_500u64);
    }

    #[test]
    fn refuses_every_kind_of_bad_message() {
        let cases = [
            ("{not json", "invalid_json"),
            ("", "invalid_json"),
            ("[1,2]", "invalid_message"),
            (r#"{"data":1}"#, "invalid_message"),
            (r#"{"event":5}"#, "invalid_message"),
            (r#"{"event":"dance"}"#, "unknown_event"),
            (r#"{"event":"setBpm","data":"140"}"#, "invalid_bpm"),
            (r#"{"event":"setBpm"}"#, "invalid_bpm"),
            (r#"{"event":"setBpm","data":null}"#, "invalid_bpm"),
            (r#"{"event":"ping"}"#, "invalid_ping"),
            (r#"{"event":"ping","data":{"t0":"now"}}"#, "invalid_ping"),
            (r#"{"event":"ping","data":5}"#, "invalid_ping"),
            (
                r#"{"event":"start","data":{"quantize":"bars"}}"#,
                "invalid_quantize",
            ),
            (
                r#"{"event":"start","data":{"quantize":4}}"#,
                "invalid_quantize",
            ),
        ];
        for (text, code) in cases {
            let err = decode(text).expect_err(text);
            assert_eq!(err.code(), code, "{text}: {err}");
        }
    }

    #[test]
    fn long_multibyte_event_names_are_clipped_by_character() {
        let name = format!("a{}", "é".repeat(60));
        let err = decode(&format!(r#"{{"event":"{name}"}}"#)).unwrap_err();
        let ClientError::UnknownEvent(echoed) = err else {
            panic!("{err:?}")
        };
        assert_eq!(echoed.chars().count(), 40);
    }

    #[test]
    fn range_check_names_the_range() {
        let (min, max) = (Bpm::whole(60), Bpm::whole(200));
        assert_eq!(check_bpm(140.0, min, max), Ok(Bpm::whole(140)));
        assert_eq!(check_bpm(60.0, min, max), Ok(Bpm::whole(60)));
        for bad in [59.9, 200.01, -5.0, 1e300] {
            let err = check_bpm(bad, min, max).unwrap_err();
            assert_eq!(err.code(), "bpm_out_of_range");
            assert!(err.to_string().contains("60 to 200"), "{err}");
        }
    }

    #[test]
    fn text_frames_are_unmasked_and_complete() {
        let f = text_frame("hi");
        assert_eq!(&f[..], &[0x81, 0x02, b'h', b'i']);
        let long = "x".repeat(300);
        let f = text_frame(&long);
        assert_eq!(&f[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(f.len(), 304);
    }
}
