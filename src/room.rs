//! What a room is called and how the threads refer to it.
//!
//! This module owns the rule for room names and the small key every thread uses for a room.
//! It holds no state. A [`RoomKey`] is a slot (an index the hub, the timing thread and the
//! I/O layer all size for `--max-rooms`) and a generation, so that an event still in flight
//! for a room that was dropped can never be taken for the room that later reuses its slot.

use std::fmt;

use thiserror::Error;

/// The room every client that names none is in; it always exists.
pub const MAIN: &str = "main";
/// The longest room name.
pub const MAX_NAME: usize = 64;
/// How much of a refused name a refusal repeats.
const ECHO_CHARS: usize = 32;

/// A room name: 1 to 64 of `a-z`, `0-9`, `_` and `-`. Lower case only, so that a name is
/// one room however a link was typed, and safe as it is in a URL, a Socket.IO namespace, a
/// Redis key, a JSON string and a Prometheus label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);

/// Why a room name was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("a room name cannot be empty; use 1 to {MAX_NAME} of a-z, 0-9, '_' and '-'")]
    Empty,
    #[error("room names are at most {MAX_NAME} characters")]
    TooLong,
    #[error("room name {0:?} has characters other than a-z, 0-9, '_' and '-' (lower case only)")]
    BadCharacter(String),
}

impl RoomName {
    pub fn parse(name: &str) -> Result<RoomName, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME {
            return Err(NameError::TooLong);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            // The name came from the network: echo a short, printable prefix, no more.
            let shown: String = name
                .chars()
                .take(ECHO_CHARS)
                .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                .collect();
            return Err(NameError::BadCharacter(shown));
        }
        Ok(RoomName(name.to_string()))
    }

    pub fn main() -> RoomName {
        RoomName(MAIN.to_string())
    }

    pub fn is_main(&self) -> bool {
        self.0 == MAIN
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room as the threads name it: its slot, and which room in that slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomKey {
    pub slot: u32,
    pub generation: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lower_case_words() {
        for good in ["main", "a", "band-2", "class_7b", &"x".repeat(64)] {
            assert_eq!(RoomName::parse(good).unwrap().as_str(), good);
        }
        assert_eq!(RoomName::parse(""), Err(NameError::Empty));
        assert_eq!(RoomName::parse(&"x".repeat(65)), Err(NameError::TooLong));
        for bad in ["Main", "a b", "a/b", "ä", "a.b", "%2e", "a\0"] {
            assert!(
                matches!(RoomName::parse(bad), Err(NameError::BadCharacter(_))),
                "{bad:?}"
            );
        }
        assert!(RoomName::main().is_main());
        let err = RoomName::parse("Café").unwrap_err().to_string();
        assert!(err.contains("a-z, 0-9"), "{err}");
        assert!(err.contains("\"Caf?\""), "{err}");
        // A refusal repeats a short, printable prefix of what it was given, no more.
        let long = RoomName::parse(&"\u{e}".repeat(64))
            .unwrap_err()
            .to_string();
        assert!(long.len() < 160, "{long}");
    }
}
