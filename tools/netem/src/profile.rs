//! Path profiles: what a path does to the bytes in each direction, and how users write it.
//!
//! This module owns the profile model, the named presets and the text syntax of `--path`. It is
//! pure: parsing and printing only.
//!
//! Syntax: `PRESET` or `KEY=VALUE,...` or `PRESET,KEY=VALUE,...` (the keys override the preset):
//!
//! | key | meaning |
//! |---|---|
//! | `delay` | one-way delay, both directions (`75ms`, `1.5ms`, `300us`, `2s`; a bare number is ms) |
//! | `up`, `down` | one-way delay client → server, server → client |
//! | `jitter`, `up-jitter`, `down-jitter` | jitter around the delay |
//! | `dist` | jitter distribution: `uniform` (default), `normal`, `pareto` |
//! | `burst`, `up-burst`, `down-burst` | `S@P`: with probability P per chunk (`0.01` or `1%`), the direction stalls S |

use std::fmt;
use std::time::Duration;

use crate::NetemError;

/// How the jitter is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// `delay + U(−jitter, +jitter)`, as Linux netem's `delay D J`.
    Uniform,
    /// `delay + N(0, jitter)`: unbounded both ways (clipped at 0 delay).
    Normal,
    /// `delay + jitter · (X − 1)`, X Pareto with scale 1 and shape 2.5: never below `delay`,
    /// mean `delay + jitter · 2/3`, with a heavy tail of late chunks, as queues make.
    Pareto,
}

impl Distribution {
    pub fn label(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
        }
    }
}

/// A stall: with `probability` per chunk, the direction holds everything for `stall`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Burst {
    pub stall: Duration,
    pub probability: f64,
}

/// One direction of a path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Direction {
    pub delay: Duration,
    pub jitter: Duration,
    pub distribution: Distribution,
    pub burst: Option<Burst>,
}

impl Direction {
    pub const DIRECT: Direction = Direction {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        distribution: Distribution::Uniform,
        burst: None,
    };

    fn with(delay_ms: f64, jitter_ms: f64) -> Direction {
        Direction {
            delay: Duration::from_secs_f64(delay_ms / 1000.0),
            jitter: Duration::from_secs_f64(jitter_ms / 1000.0),
            ..Direction::DIRECT
        }
    }
}

/// A path: `up` is client → server (the listening side to the upstream), `down` the way back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    pub up: Direction,
    pub down: Direction,
}

/// The named profiles, with what each stands for.
pub const PRESETS: &[(&str, &str)] = &[
    ("direct", "no delay at all (to measure the emulator itself)"),
    ("lan", "1 ms ± 0.2 ms each way"),
    ("city", "20 ms ± 5 ms each way"),
    ("continent", "75 ms ± 15 ms each way"),
    (
        "intercontinental",
        "150 ms ± 30 ms each way (a 300 ms round trip)",
    ),
    (
        "mobile",
        "60 ms ± 40 ms each way, and 1 % of chunks stall their direction 300 ms",
    ),
    ("asymmetric", "20 ms up, 100 ms down, ± 2 ms"),
];

impl Profile {
    pub const DIRECT: Profile = Profile {
        up: Direction::DIRECT,
        down: Direction::DIRECT,
    };

    pub fn symmetric(delay_ms: f64, jitter_ms: f64) -> Profile {
        let d = Direction::with(delay_ms, jitter_ms);
        Profile { up: d, down: d }
    }

    /// A named profile (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Profile> {
        Some(match name {
            "direct" => Profile::DIRECT,
            "lan" => Profile::symmetric(1.0, 0.2),
            "city" => Profile::symmetric(20.0, 5.0),
            "continent" => Profile::symmetric(75.0, 15.0),
            "intercontinental" => Profile::symmetric(150.0, 30.0),
            "mobile" => {
                let mut p = Profile::symmetric(60.0, 40.0);
                let burst = Some(Burst {
                    stall: Duration::from_millis(300),
                    probability: 0.01,
                });
                p.up.burst = burst;
                p.down.burst = burst;
                p
            }
            "asymmetric" => Profile {
                up: Direction::with(20.0, 2.0),
                down: Direction::with(100.0, 2.0),
            },
            _ => return None,
        })
    }

    /// Parses the `--path` syntax (module docs).
    pub fn parse(spec: &str) -> Result<Profile, NetemError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(NetemError::Profile(
                "empty profile; name a preset (conductor-netem profiles) or give delay=…".into(),
            ));
        }
        let mut items = spec.split(',').map(str::trim).peekable();
        let mut p = match items.peek() {
            Some(first) if !first.contains('=') => {
                let name = *first;
                items.next();
                Profile::preset(name).ok_or_else(|| {
                    NetemError::Profile(format!(
                        "unknown profile {name:?}; presets: {}",
                        PRESETS
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
            }
            _ => Profile::DIRECT,
        };
        for item in items {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                NetemError::Profile(format!("{item:?} is not KEY=VALUE (e.g. delay=75ms)"))
            })?;
            let (key, value) = (key.trim(), value.trim());
            match key {
                "delay" => {
                    let d = duration(value)?;
                    p.up.delay = d;
                    p.down.delay = d;
                }
                "up" => p.up.delay = duration(value)?,
                "down" => p.down.delay = duration(value)?,
                "jitter" => {
                    let j = duration(value)?;
                    p.up.jitter = j;
                    p.down.jitter = j;
                }
                "up-jitter" => p.up.jitter = duration(value)?,
                "down-jitter" => p.down.jitter = duration(value)?,
                "dist" | "distribution" => {
                    let d = match value {
                        "uniform" => Distribution::Uniform,
                        "normal" => Distribution::Normal,
                        "pareto" => Distribution::Pareto,
                        _ => {
                            return Err(NetemError::Profile(format!(
                                "distribution {value:?}; choose uniform, normal or pareto"
                            )));
                        }
                    };
                    p.up.distribution = d;
                    p.down.distribution = d;
                }
                "burst" => {
                    let b = burst(value)?;
                    p.up.burst = b;
                    p.down.burst = b;
                }
                "up-burst" => p.up.burst = burst(value)?,
                "down-burst" => p.down.burst = burst(value)?,
                _ => {
                    return Err(NetemError::Profile(format!(
                        "unknown key {key:?}; keys: delay, up, down, jitter, up-jitter, \
                         down-jitter, dist, burst, up-burst, down-burst"
                    )));
                }
            }
        }
        Ok(p)
    }
}

/// `75ms`, `1.5ms`, `300us`, `2s`, or a bare number of ms. At most an hour.
pub fn duration(text: &str) -> Result<Duration, NetemError> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("µs")) {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * scale <= 3600.0 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(NetemError::Profile(format!(
            "{text:?} is not a duration; write e.g. 75ms, 1.5ms, 300us or 2s (0 to 1 hour)"
        ))),
    }
}

/// `S@P`: a stall and its probability per chunk (`0.01` or `1%`).
fn burst(text: &str) -> Result<Option<Burst>, NetemError> {
    if text == "none" || text == "0" {
        return Ok(None);
    }
    let bad = || {
        NetemError::Profile(format!(
            "burst {text:?}; write STALL@PROBABILITY, e.g. 300ms@0.01 or 300ms@1%"
        ))
    };
    let (stall, p) = text.split_once('@').ok_or_else(bad)?;
    let stall = duration(stall)?;
    let p = p.trim();
    let probability = match p.strip_suffix('%') {
        Some(pct) => pct.trim().parse::<f64>().map(|v| v / 100.0),
        None => p.parse::<f64>(),
    }
    .map_err(|_| bad())?;
    if !(0.0..=1.0).contains(&probability) {
        return Err(bad());
    }
    Ok(Some(Burst { stall, probability }))
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v.fract() == 0.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v} ms")
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", ms(self.delay))?;
        if !self.jitter.is_zero() {
            write!(f, " ± {} {}", ms(self.jitter), self.distribution.label())?;
        }
        if let Some(b) = self.burst {
            write!(f, ", stalls {} at {}%", ms(b.stall), b.probability * 100.0)?;
        }
        Ok(())
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.up == self.down {
            write!(f, "{} each way", self.up)
        } else {
            write!(f, "up {}, down {}", self.up, self.down)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_overrides() {
        let p = Profile::parse("intercontinental").unwrap();
        assert_eq!(p.up.delay, Duration::from_millis(150));
        assert_eq!(p.down.jitter, Duration::from_millis(30));
        let p = Profile::parse("city, dist=normal, down-burst=300ms@2%").unwrap();
        assert_eq!(p.up.delay, Duration::from_millis(20));
        assert_eq!(p.up.distribution, Distribution::Normal);
        assert_eq!(p.up.burst, None);
        assert_eq!(
            p.down.burst,
            Some(Burst {
                stall: Duration::from_millis(300),
                probability: 0.02
            })
        );
        let p = Profile::parse("up=20ms,down=100,jitter=1.5ms").unwrap();
        assert_eq!(p.down.delay, Duration::from_millis(100));
        assert_eq!(p.up.jitter, Duration::from_micros(1500));
        assert_eq!(
            p.to_string(),
            "up 20 ms ± 1.5 ms uniform, down 100 ms ± 1.5 ms uniform"
        );
        assert_eq!(
            Profile::parse("mobile").unwrap().to_string(),
            "60 ms ± 40 ms uniform, stalls 300 ms at 1% each way"
        );
        for (name, _) in PRESETS {
            assert!(Profile::preset(name).is_some(), "{name}");
        }
    }

    #[test]
    fn bad_specs_say_what_to_write() {
        for (spec, hint) in [
            ("", "preset"),
            ("moon", "presets: direct, lan"),
            ("delay", "unknown profile"),
            ("city,delay", "KEY=VALUE"),
            ("delay=fast", "75ms"),
            ("delay=-5ms", "75ms"),
            ("delay=2h", "75ms"),
            ("wobble=3", "keys:"),
            ("dist=cauchy", "uniform, normal or pareto"),
            ("burst=300ms", "STALL@PROBABILITY"),
            ("burst=300ms@150%", "STALL@PROBABILITY"),
        ] {
            let err = Profile::parse(spec).expect_err(spec).to_string();
            assert!(err.contains(hint), "{spec}: {err}");
        }
    }
}
