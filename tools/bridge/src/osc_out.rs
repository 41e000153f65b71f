//! OSC output over UDP: the plan's steps as OSC messages, or as one timed bundle per step.
//!
//! This module owns the OSC address space (below) and the encoding, through `rosc`. The
//! messages are built once; a step only changes their arguments in place and is encoded into a
//! reused buffer, so preparing and sending a step allocates nothing. [`OscSink::prepare`] runs
//! before the emitter sleeps; [`OscSink::send`] is the emit path and only calls `send(2)`.
//!
//! | address | arguments | when |
//! |---|---|---|
//! | `/conductor/tick` | `i` count, `f` bpm | every tick the server plays |
//! | `/conductor/beat` | `i` beat (count / ppqn), `i` beat in the bar (0 = downbeat) | each played tick that begins a beat |
//! | `/conductor/bar` | `i` bar (count / (ppqn · beats per bar)) | each played tick that begins a bar |
//! | `/conductor/tempo` | `f` bpm, `i` ppqn, `i` beats per bar | a tempo's first tick, and on joining |
//! | `/conductor/transport` | `s` "playing" or "stopped", `i` the count it holds from | a transport change's first tick, and on joining |
//!
//! Counts are the server's (`tick.count`), sent as 32-bit integers (every OSC receiver reads
//! `i`; few read 64-bit `h`), wrapping to 0 after 2³¹ − 1 (310 days of 24-ppqn ticks at 200 BPM).

use std::io;
use std::net::{SocketAddr, UdpSocket};

use rosc::{OscBundle, OscMessage, OscPacket, OscTime, OscType};

use crate::osc_plan::OscStep;

pub const TICK: &str = "/conductor/tick";
pub const BEAT: &str = "/conductor/beat";
pub const BAR: &str = "/conductor/bar";
pub const TEMPO: &str = "/conductor/tempo";
pub const TRANSPORT: &str = "/conductor/transport";

/// Seconds from the NTP epoch (1900) to the unix epoch (1970), RFC 5905.
const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;

/// Messages in one step, at most: transport, tempo, bar, beat, tick.
const SLOTS: usize = 5;

/// The NTP timetag of a unix time in nanoseconds: seconds since 1900, and the fraction of a
/// second in units of 2⁻³² s (rounded down; 0.23 ns).
pub fn ntp_time(unix_ns: i64) -> OscTime {
    let ns = u64::try_from(unix_ns).unwrap_or(0);
    let seconds = ns / 1_000_000_000 + NTP_UNIX_OFFSET_S;
    let fraction = ((ns % 1_000_000_000) << 32) / 1_000_000_000;
    // NTP seconds wrap in 2036 (era 1); receivers do the same arithmetic.
    OscTime::from((seconds as u32, fraction as u32))
}

/// One OSC target.
pub struct OscSink {
    socket: UdpSocket,
    bundles: bool,
    /// The five messages, built once, their arguments overwritten per step.
    slots: [OscPacket; SLOTS],
    /// Which slots the prepared step uses, in order.
    used: [bool; SLOTS],
    bundle: OscBundle,
    /// One encoded datagram per used slot (or the bundle in the first).
    datagrams: [Vec<u8>; SLOTS],
    prepared: usize,
}

const TRANSPORT_SLOT: usize = 0;
const TEMPO_SLOT: usize = 1;
const BAR_SLOT: usize = 2;
const BEAT_SLOT: usize = 3;
const TICK_SLOT: usize = 4;

fn message(addr: &str, args: Vec<OscType>) -> OscPacket {
    OscPacket::Message(OscMessage {
        addr: addr.to_string(),
        args,
    })
}

impl OscSink {
    /// A UDP socket sending to `addr` (from an ephemeral port on the matching family).
    pub fn open(addr: SocketAddr, bundles: bool) -> io::Result<OscSink> {
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        Ok(OscSink {
            socket,
            bundles,
            slots: [
                message(
                    TRANSPORT,
                    vec![OscType::String(String::with_capacity(16)), OscType::Int(0)],
                ),
                message(
                    TEMPO,
                    vec![OscType::Float(0.0), OscType::Int(0), OscType::Int(0)],
                ),
                message(BAR, vec![OscType::Int(0)]),
                message(BEAT, vec![OscType::Int(0), OscType::Int(0)]),
                message(TICK, vec![OscType::Int(0), OscType::Float(0.0)]),
            ],
            used: [false; SLOTS],
            bundle: OscBundle {
                timetag: OscTime::from((0, 0)),
                content: Vec::with_capacity(SLOTS),
            },
            datagrams: std::array::from_fn(|_| Vec::with_capacity(256)),
            prepared: 0,
        })
    }

    /// Encodes `step` into datagrams, ready to [`Self::send`]. `timetag` is the instant the
    /// step must take effect, on the receiver's (wall) clock; used only for bundles.
    pub fn prepare(&mut self, step: &OscStep, timetag: OscTime) {
        let e = step.events;
        self.used = [e.transport, e.tempo, e.bar, e.beat, e.tick];
        let count = wrap_count(step.count);
        let ppqn = u64::from(step.ppqn.max(1));
        let bpb = u64::from(step.beats_per_bar.max(1));
        set_args(&mut self.slots[TRANSPORT_SLOT], |args| {
            if let Some(OscType::String(s)) = args.get_mut(0) {
                s.clear();
                s.push_str(if step.playing { "playing" } else { "stopped" });
            }
            args[1] = OscType::Int(count);
        });
        set_args(&mut self.slots[TEMPO_SLOT], |args| {
            args[0] = OscType::Float(step.bpm as f32);
            args[1] = OscType::Int(i32::try_from(step.ppqn).unwrap_or(i32::MAX));
            args[2] = OscType::Int(i32::try_from(step.beats_per_bar).unwrap_or(i32::MAX));
        });
        set_args(&mut self.slots[BAR_SLOT], |args| {
            args[0] = OscType::Int(wrap_count(step.count / (ppqn * bpb)));
        });
        set_args(&mut self.slots[BEAT_SLOT], |args| {
            let beat = step.count / ppqn;
            args[0] = OscType::Int(wrap_count(beat));
            args[1] = OscType::Int((beat % bpb) as i32);
        });
        set_args(&mut self.slots[TICK_SLOT], |args| {
            args[0] = OscType::Int(count);
            args[1] = OscType::Float(step.bpm as f32);
        });

        self.prepared = 0;
        if self.bundles {
            // Move the messages into the bundle and back: no copies, no allocation.
            self.bundle.timetag = timetag;
            for (slot, used) in self.slots.iter_mut().zip(self.used) {
                if used {
                    let placeholder = OscPacket::Message(OscMessage {
                        addr: String::new(),
                        args: Vec::new(),
                    });
                    self.bundle
                        .content
                        .push(std::mem::replace(slot, placeholder));
                }
            }
            let buf = &mut self.datagrams[0];
            buf.clear();
            let packet = OscPacket::Bundle(std::mem::replace(
                &mut self.bundle,
                OscBundle {
                    timetag,
                    content: Vec::new(),
                },
            ));
            let _ = rosc::encoder::encode_into(&packet, buf);
            if let OscPacket::Bundle(mut bundle) = packet {
                let mut returned = bundle.content.drain(..);
                for (slot, used) in self.slots.iter_mut().zip(self.used) {
                    if used && let Some(p) = returned.next() {
                        *slot = p;
                    }
                }
                drop(returned);
                self.bundle = bundle;
            }
            self.prepared = 1;
        } else {
            for (slot, used) in self.slots.iter().zip(self.used) {
                if used {
                    let buf = &mut self.datagrams[self.prepared];
                    buf.clear();
                    let _ = rosc::encoder::encode_into(slot, buf);
                    self.prepared += 1;
                }
            }
        }
    }

    /// Sends what [`Self::prepare`] encoded. Returns how many datagrams the kernel refused
    /// (a full socket buffer) and the last error.
    pub fn send(&mut self) -> Result<(), io::Error> {
        let mut result = Ok(());
        for buf in &self.datagrams[..self.prepared] {
            // A refused datagram (full buffer, or ECONNREFUSED from an earlier one reaching a
            // closed port) must not keep the rest from going out.
            if let Err(e) = self.socket.send(buf) {
                result = Err(e);
            }
        }
        self.prepared = 0;
        result
    }

    /// The prepared datagrams (for tests).
    pub fn prepared(&self) -> impl Iterator<Item = &[u8]> {
        self.datagrams[..self.prepared].iter().map(|d| d.as_slice())
    }
}

fn set_args(packet: &mut OscPacket, f: impl FnOnce(&mut Vec<OscType>)) {
    if let OscPacket::Message(m) = packet {
        f(&mut m.args);
    }
}

/// A count as a non-negative OSC int32.
fn wrap_count(count: u64) -> i32 {
    (count % (1 << 31)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osc_plan::{OscEvents, OscPlan};
    use std::time::Duration;

    fn step(events: OscEvents, count: u64, playing: bool) -> OscStep {
        OscStep {
            at_ns: 0,
            events,
            count,
            playing,
            bpm: 92.5,
            ppqn: 4,
            beats_per_bar: 3,
            then: OscPlan::new(),
        }
    }

    fn decode(bytes: &[u8]) -> OscPacket {
        rosc::decoder::decode_udp(bytes).expect("valid OSC").1
    }

    fn msg(p: &OscPacket) -> (&str, &[OscType]) {
        match p {
            OscPacket::Message(m) => (m.addr.as_str(), m.args.as_slice()),
            OscPacket::Bundle(_) => panic!("a bundle"),
        }
    }

    #[test]
    fn ntp_timetags_count_from_1900_in_2_pow_32_fractions() {
        let t = ntp_time(1_700_000_000_500_000_000);
        assert_eq!(t.seconds, (1_700_000_000u64 + 2_208_988_800) as u32);
        assert_eq!(t.fractional, 1 << 31);
        let t = ntp_time(250_000_000);
        assert_eq!((t.seconds, t.fractional), (2_208_988_800, 1 << 30));
    }

    #[test]
    fn a_downbeat_is_five_messages_in_order_or_one_bundle() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let all = OscEvents {
            transport: true,
            tempo: true,
            bar: true,
            beat: true,
            tick: true,
        };
        // 3/4 at ppqn 4: count 24 is bar 2, beat 6, beat 0 of its bar.
        let s = step(all, 24, true);
        let mut sink = OscSink::open(receiver.local_addr().unwrap(), false).unwrap();
        sink.prepare(&s, ntp_time(0));
        sink.send().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..5 {
            let n = receiver.recv(&mut buf).unwrap();
            got.push(decode(&buf[..n]));
        }
        let m: Vec<(&str, &[OscType])> = got.iter().map(msg).collect();
        assert_eq!(m[0].0, TRANSPORT);
        assert_eq!(
            m[0].1,
            [OscType::String("playing".into()), OscType::Int(24)]
        );
        assert_eq!(m[1].0, TEMPO);
        assert_eq!(
            m[1].1,
            [OscType::Float(92.5), OscType::Int(4), OscType::Int(3)]
        );
        assert_eq!(m[2], (BAR, &[OscType::Int(2)][..]));
        assert_eq!(m[3], (BEAT, &[OscType::Int(6), OscType::Int(0)][..]));
        assert_eq!(m[4], (TICK, &[OscType::Int(24), OscType::Float(92.5)][..]));

        // As a bundle: one datagram with the timetag and the same five messages.
        let mut sink = OscSink::open(receiver.local_addr().unwrap(), true).unwrap();
        let tag = ntp_time(1_700_000_000_123_456_789);
        sink.prepare(&s, tag);
        sink.send().unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        let OscPacket::Bundle(b) = decode(&buf[..n]) else {
            panic!("not a bundle");
        };
        assert_eq!(b.timetag, tag);
        let inner: Vec<&str> = b.content.iter().map(|p| msg(p).0).collect();
        assert_eq!(inner, [TRANSPORT, TEMPO, BAR, BEAT, TICK]);

        // The next step reuses the messages: a plain tick, then a stop.
        let tick_only = OscEvents {
            tick: true,
            ..OscEvents::default()
        };
        sink.prepare(&step(tick_only, 25, true), tag);
        let only: Vec<OscPacket> = sink.prepared().map(decode).collect();
        let OscPacket::Bundle(b) = &only[0] else {
            panic!()
        };
        assert_eq!(b.content.len(), 1);
        assert_eq!(
            msg(&b.content[0]).1,
            [OscType::Int(25), OscType::Float(92.5)]
        );
        let stop = OscEvents {
            transport: true,
            ..OscEvents::default()
        };
        sink.prepare(&step(stop, 26, false), tag);
        let OscPacket::Bundle(b) = decode(sink.prepared().next().unwrap()) else {
            panic!()
        };
        assert_eq!(
            msg(&b.content[0]).1,
            [OscType::String("stopped".into()), OscType::Int(26)]
        );
    }

    #[test]
    fn counts_wrap_to_non_negative_ints() {
        assert_eq!(wrap_count(5), 5);
        assert_eq!(wrap_count((1 << 31) + 7), 7);
    }
}
