//! Reading what tick servers send: the plain JSON protocol and Socket.IO v4 over Engine.IO v4.
//!
//! Pure parsing, no I/O. Anything that is not a tick, a hello or a protocol packet the probe
//! must answer is `Other` and ignored.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The fields of a tick the probe uses. Servers may send more.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct TickFields {
    pub count: u64,
    pub bpm: f64,
    /// Scheduled (or sent) instant, unix ms.
    #[serde(default)]
    pub time: Option<f64>,
    /// Scheduled instant, unix µs (conductor's extension).
    #[serde(default)]
    pub time_us: Option<i64>,
    #[serde(default)]
    pub ppqn: Option<u32>,
}

impl TickFields {
    /// The scheduled instant in unix µs, as precisely as the server gave it.
    pub fn scheduled_us(&self) -> Option<i64> {
        self.time_us
            .or_else(|| self.time.map(|ms| (ms * 1000.0) as i64))
    }
}

/// A message in the tick protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    Hello {
        ppqn: Option<u32>,
        /// Beats in a bar (conductor's hello), for `?ticks=bar`.
        beats_per_bar: Option<u32>,
    },
    Tick(TickFields),
    Other,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct HelloFields {
    #[serde(default)]
    ppqn: Option<u32>,
    #[serde(default)]
    beats_per_bar: Option<u32>,
}

fn event(name: &str, data: Option<&RawValue>) -> Event {
    match (name, data) {
        ("tick", Some(d)) => serde_json::from_str(d.get()).map_or(Event::Other, Event::Tick),
        ("hello", Some(d)) => {
            serde_json::from_str::<HelloFields>(d.get()).map_or(Event::Other, |h| Event::Hello {
                ppqn: h.ppqn,
                beats_per_bar: h.beats_per_bar,
            })
        }
        _ => Event::Other,
    }
}

/// `{"event": NAME, "data": ...}`.
pub fn parse_json_event(text: &str) -> Event {
    match serde_json::from_str::<Envelope>(text) {
        Ok(env) => event(env.event, env.data),
        Err(_) => Event::Other,
    }
}

/// An Engine.IO v4 packet, as far as the probe cares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EnginePacket {
    /// `0{...}`: the handshake; the client must then connect the namespace.
    Open,
    /// `1`: the server closes.
    Close,
    /// `2`: the server pings; answer `3`.
    Ping,
    /// `40...`: the default namespace is connected.
    Connected,
    /// `44...`: the namespace refused the connection.
    ConnectError,
    /// `42[...]`: an event.
    Event(Event),
    Other,
}

/// Parses one Engine.IO text packet carrying Socket.IO packets on the default namespace.
pub fn parse_engine_io(text: &str) -> EnginePacket {
    let mut chars = text.chars();
    match chars.next() {
        Some('0') => EnginePacket::Open,
        Some('1') => EnginePacket::Close,
        Some('2') => EnginePacket::Ping,
        Some('4') => match chars.next() {
            Some('0') => EnginePacket::Connected,
            Some('4') => EnginePacket::ConnectError,
            Some('2') => EnginePacket::Event(parse_socket_io_event(&text[2..])),
            _ => EnginePacket::Other,
        },
        _ => EnginePacket::Other,
    }
}

/// `["tick",{...}]`, possibly after an ack id.
fn parse_socket_io_event(payload: &str) -> Event {
    let json = payload.trim_start_matches(|c: char| c.is_ascii_digit());
    match serde_json::from_str::<(&str, &RawValue)>(json) {
        Ok((name, data)) => event(name, Some(data)),
        Err(_) => Event::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conductor_ticks_and_hello() {
        let t = parse_json_event(
            r#"{"event":"tick","data":{"time":1640995200000,"bpm":120,"count":1234,"time_us":1640995200000123,"ppqn":4}}"#,
        );
        let Event::Tick(t) = t else { panic!("{t:?}") };
        assert_eq!(t.count, 1234);
        assert_eq!(t.bpm, 120.0);
        assert_eq!(t.scheduled_us(), Some(1_640_995_200_000_123));
        assert_eq!(t.ppqn, Some(4));
        assert_eq!(
            parse_json_event(r#"{"event":"hello","data":{"bpm":120,"ppqn":24}}"#),
            Event::Hello {
                ppqn: Some(24),
                beats_per_bar: None
            }
        );
        assert_eq!(
            parse_json_event(r#"{"event":"hello","data":{"ppqn":4,"beats_per_bar":3}}"#),
            Event::Hello {
                ppqn: Some(4),
                beats_per_bar: Some(3)
            }
        );
    }

    #[test]
    fn seed_ticks_without_extensions() {
        let Event::Tick(t) = parse_json_event(
            r#"{"event":"tick","data":{"time":1640995200000,"bpm":120,"count":7}}"#,
        ) else {
            panic!()
        };
        assert_eq!(t.scheduled_us(), Some(1_640_995_200_000_000));
        assert_eq!(t.ppqn, None);
    }

    #[test]
    fn anything_else_is_other() {
        for text in [
            "",
            "nope",
            r#"{"event":"bpmChange","data":140}"#,
            r#"{"event":"tick","data":{"count":"x"}}"#,
        ] {
            assert_eq!(parse_json_event(text), Event::Other, "{text}");
        }
    }

    #[test]
    fn engine_io_packets() {
        assert_eq!(
            parse_engine_io(r#"0{"sid":"a","pingInterval":25000}"#),
            EnginePacket::Open
        );
        assert_eq!(parse_engine_io("2"), EnginePacket::Ping);
        assert_eq!(parse_engine_io("1"), EnginePacket::Close);
        assert_eq!(parse_engine_io(r#"40{"sid":"x"}"#), EnginePacket::Connected);
        assert_eq!(
            parse_engine_io(r#"44{"message":"no"}"#),
            EnginePacket::ConnectError
        );
        let p = parse_engine_io(r#"42["tick",{"time":1640995200000,"bpm":120,"count":3}]"#);
        let EnginePacket::Event(Event::Tick(t)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(t.count, 3);
        assert_eq!(
            parse_engine_io(r#"4212["bpmChange",140]"#),
            EnginePacket::Event(Event::Other)
        );
        assert_eq!(parse_engine_io("6"), EnginePacket::Other);
    }
}
