//! Which ticks a client asked for (`?ticks=all|beat|bar|none`, or Socket.IO's `auth.ticks`),
//! and which clients a tick goes to.
//!
//! This module owns the rule: `all` gets every tick (the predecessor's protocol), `beat` the
//! counts that are a multiple of ppqn, `bar` the multiples of ppqn × beats per bar (the bar
//! lines a quantised start lands on), `none` no ticks at all. It holds no state and does no
//! I/O; the hub keeps each room's members grouped by choice so that a fan-out visits only the
//! groups an [`Audience`] names.

use std::fmt;

use thiserror::Error;

/// How much of a refused value a refusal repeats.
const ECHO_CHARS: usize = 16;

/// What a client receives of the ticks. Everything else (`hello`, `timeline`, `bpmChange`,
/// `transport`, answers, pings) reaches every client whatever it chose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TickChoice {
    /// Every tick: the default.
    #[default]
    All,
    /// Ticks on a beat: counts that are a multiple of ppqn.
    Beat,
    /// Ticks on a bar line: multiples of ppqn × the room's beats per bar.
    Bar,
    /// No ticks: the client schedules on the timeline.
    None,
}

/// Why a `ticks` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TicksError {
    #[error("ticks must be one of all, beat, bar or none (got {0:?})")]
    Unknown(String),
    #[error("ticks must be a string: all, beat, bar or none")]
    NotAString,
}

impl TickChoice {
    pub const ALL: [TickChoice; 4] = [
        TickChoice::All,
        TickChoice::Beat,
        TickChoice::Bar,
        TickChoice::None,
    ];

    /// Reads a value as sent (case-sensitive, like every other name in the protocol).
    pub fn parse(value: &str) -> Result<TickChoice, TicksError> {
        match value {
            "all" => Ok(TickChoice::All),
            "beat" => Ok(TickChoice::Beat),
            "bar" => Ok(TickChoice::Bar),
            "none" => Ok(TickChoice::None),
            other => Err(TicksError::Unknown(
                other.chars().take(ECHO_CHARS).collect(),
            )),
        }
    }

    /// Reads an optional query parameter: absent or empty is the default.
    pub fn from_param(value: Option<&str>) -> Result<Option<TickChoice>, TicksError> {
        match value {
            None | Some("") => Ok(None),
            Some(v) => TickChoice::parse(v).map(Some),
        }
    }

    /// Reads `auth.ticks` of a Socket.IO CONNECT: absent is `None`, a non-string an error.
    pub fn from_auth(auth: Option<&serde_json::Value>) -> Result<Option<TickChoice>, TicksError> {
        match auth.and_then(|a| a.get("ticks")) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => TickChoice::parse(s).map(Some),
            Some(_) => Err(TicksError::NotAString),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TickChoice::All => "all",
            TickChoice::Beat => "beat",
            TickChoice::Bar => "bar",
            TickChoice::None => "none",
        }
    }

    /// Its group's index in a room's members.
    pub fn index(self) -> usize {
        self as usize
    }

    fn bit(self) -> u8 {
        1 << self.index()
    }
}

impl fmt::Display for TickChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The groups of a room's members a broadcast goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audience(u8);

impl Audience {
    /// Every member: for everything but ticks.
    pub const EVERYONE: Audience = Audience(0b1111);

    /// The members tick `count` goes to. Bar lines are absolute counts, like those a quantised
    /// start lands on, so a `bar` client hears the same downbeats a `transport` start uses.
    pub fn for_tick(count: u64, ppqn: u32, beats_per_bar: u32) -> Audience {
        let beat = u64::from(ppqn.max(1));
        let bar = beat * u64::from(beats_per_bar.max(1));
        let mut bits = TickChoice::All.bit();
        if count.is_multiple_of(beat) {
            bits |= TickChoice::Beat.bit();
        }
        if count.is_multiple_of(bar) {
            bits |= TickChoice::Bar.bit();
        }
        Audience(bits)
    }

    pub fn includes(self, choice: TickChoice) -> bool {
        self.0 & choice.bit() != 0
    }

    /// The groups it names, in a fixed order.
    pub fn groups(self) -> impl Iterator<Item = TickChoice> {
        TickChoice::ALL
            .into_iter()
            .filter(move |c| self.includes(*c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_parse_and_refusals_say_what_is_allowed() {
        for c in TickChoice::ALL {
            assert_eq!(TickChoice::parse(c.label()), Ok(c));
        }
        assert_eq!(TickChoice::from_param(None), Ok(None));
        assert_eq!(TickChoice::from_param(Some("")), Ok(None));
        assert_eq!(
            TickChoice::from_param(Some("bar")),
            Ok(Some(TickChoice::Bar))
        );
        let e = TickChoice::parse("Beat").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ticks must be one of all, beat, bar or none (got \"Beat\")"
        );
        let long = "x".repeat(1000);
        assert!(TickChoice::parse(&long).unwrap_err().to_string().len() < 80);
    }

    #[test]
    fn auth_takes_a_string_or_nothing() {
        let auth = serde_json::json!({"ticks": "none", "token": "t"});
        assert_eq!(
            TickChoice::from_auth(Some(&auth)),
            Ok(Some(TickChoice::None))
        );
        assert_eq!(TickChoice::from_auth(None), Ok(None));
        let no = serde_json::json!({"token": "t"});
        assert_eq!(TickChoice::from_auth(Some(&no)), Ok(None));
        let bad = serde_json::json!({"ticks": 4});
        assert_eq!(
            TickChoice::from_auth(Some(&bad)),
            Err(TicksError::NotAString)
        );
    }

    #[test]
    fn none_is_never_in_an_audience_and_everyone_includes_it() {
        for count in 0..200 {
            assert!(!Audience::for_tick(count, 4, 4).includes(TickChoice::None));
        }
        assert!(Audience::EVERYONE.includes(TickChoice::None));
        assert_eq!(Audience::EVERYONE.groups().count(), 4);
    }

    proptest! {
        #[test]
        fn each_choice_gets_exactly_its_counts(count in any::<u64>(), ppqn in 1u32..=96, bpb in 1u32..=16) {
            let a = Audience::for_tick(count, ppqn, bpb);
            prop_assert!(a.includes(TickChoice::All));
            prop_assert_eq!(a.includes(TickChoice::Beat), count % u64::from(ppqn) == 0);
            prop_assert_eq!(
                a.includes(TickChoice::Bar),
                count % (u64::from(ppqn) * u64::from(bpb)) == 0
            );
            // A bar line is always a beat.
            prop_assert!(!a.includes(TickChoice::Bar) || a.includes(TickChoice::Beat));
        }
    }
}
