//! The real bridge against the real server: a pty as the MIDI device, UDP sockets as OSC
//! targets. Bounds are generous (the machine is shared and noisy): these tests check what is
//! sent and roughly when; the precision claims are measured in bench/bridge.

#[path = "../../../tests/common/mod.rs"]
mod common;
mod harness;

use std::time::Duration;

use common::Server;
use harness::{Bridge, Byte, OscReceiver, Pty, run, tick_ns};
use rosc::{OscPacket, OscType};
use serde_json::{Value, json};

const F8: u8 = 0xF8;
const FA: u8 = 0xFA;
const FB: u8 = 0xFB;
const FC: u8 = 0xFC;
const F2: u8 = 0xF2;

/// Clock period at 120 BPM: 60 s / (120 · 24).
const CLOCK_120: f64 = 20_833_333.3;

fn url(server: &Server) -> String {
    format!("ws://127.0.0.1:{}/ws", server.port)
}

/// The bridge on `pty`, gentle on a shared machine (no SCHED_FIFO, no memory lock).
fn bridge_on(server: &Server, pty: &Pty, extra: &[&str]) -> Bridge {
    let url = url(server);
    let path = pty.path_str();
    let mut args = vec![
        url.as_str(),
        "--midi-device",
        path.as_str(),
        "--rt-priority",
        "0",
        "--no-mlock",
    ];
    args.extend_from_slice(extra);
    Bridge::start(&args)
}

/// Positions of `byte` in what was read.
fn find(bytes: &[Byte], byte: u8) -> Vec<usize> {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| b.byte == byte)
        .map(|(i, _)| i)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The next `timeline` event, and the `transport` event before it if `want_transport`.
fn next_timeline(client: &mut common::Client) -> Value {
    client.next_event("timeline")
}

#[test]
fn joining_a_playing_server_locates_then_continues_on_the_grid() {
    let server = Server::start(&["--bpm", "120"]);
    let mut client = server.ws();
    let timeline = next_timeline(&mut client);
    let pty = Pty::open();
    let _bridge = bridge_on(&server, &pty, &[]);
    pty.wait_until(Duration::from_secs(10), "Continue", |b| {
        find(b, FB)
            .first()
            .is_some_and(|&i| find(&b[i..], F8).len() > 100)
    });
    let bytes = pty.bytes();
    // First Stop (the device's state is unknown), then the Song Position Pointer.
    assert_eq!(bytes[0].byte, FC, "{:02X?}", &bytes[..8]);
    assert_eq!(bytes[1].byte, F2);
    let position = u64::from(bytes[2].byte) | u64::from(bytes[3].byte) << 7;
    assert_eq!(find(&bytes, FB).len(), 1);
    assert!(find(&bytes, FA).is_empty() && find(&bytes, FC).len() == 1);
    let cont = find(&bytes, FB)[0];
    // The server plays from count 0 at ppqn 4: the 16th `position` is tick `position`.
    let due = tick_ns(&timeline, position);
    let off = (bytes[cont].at_ns - due) as f64 / 1e6;
    assert!(off.abs() < 15.0, "Continue {off:.3} ms from its 16th");
    // Continue comes with its clock.
    assert_eq!(bytes[cont + 1].byte, F8);
    // Every clock after it on the grid: clock k at due + k·period.
    let clocks: Vec<&Byte> = bytes[cont + 1..].iter().filter(|b| b.byte == F8).collect();
    let devs: Vec<f64> = clocks
        .iter()
        .enumerate()
        .map(|(k, b)| (b.at_ns - due) as f64 - k as f64 * CLOCK_120)
        .collect();
    let med = median(devs.iter().map(|d| d.abs()).collect());
    assert!(med < 3e6, "median deviation {:.3} ms", med / 1e6);
    // And no drift: the last clock as close as the first, bar noise.
    let last = devs.last().unwrap();
    assert!(last.abs() < 15e6, "last clock {:.3} ms off", last / 1e6);
}

#[test]
fn stop_start_on_the_bar_and_a_tempo_change_reach_the_device() {
    let server = Server::start(&["--bpm", "120"]);
    let mut client = server.ws();
    let _ = next_timeline(&mut client);
    let pty = Pty::open();
    let _bridge = bridge_on(&server, &pty, &[]);
    pty.wait_until(Duration::from_secs(10), "Continue", |b| {
        !find(b, FB).is_empty()
    });

    client.send_json(&json!({"event": "stop"}));
    let stop = client.next_event("transport");
    assert_eq!(stop["data"]["state"], "stopped");
    let stopped_tl = next_timeline(&mut client);
    let stop_count = stop["data"]["count"].as_u64().unwrap();
    pty.wait_until(Duration::from_secs(5), "Stop", |b| find(b, FC).len() >= 2);
    let bytes = pty.bytes();
    let fc = *find(&bytes, FC).last().unwrap();
    let off = (bytes[fc].at_ns - tick_ns(&stopped_tl, stop_count)) as f64 / 1e6;
    assert!(off.abs() < 15.0, "Stop {off:.3} ms from its tick");

    client.send_json(&json!({"event": "start"}));
    let start = client.next_event("transport");
    assert_eq!(start["data"]["state"], "playing");
    let started_tl = next_timeline(&mut client);
    let start_count = start["data"]["count"].as_u64().unwrap();
    assert_eq!(start_count % 16, 0, "the server starts on a bar line");
    pty.wait_until(Duration::from_secs(5), "Start", |b| !find(b, FA).is_empty());
    let bytes = pty.bytes();
    let fa = find(&bytes, FA)[0];
    let off = (bytes[fa].at_ns - tick_ns(&started_tl, start_count)) as f64 / 1e6;
    assert!(off.abs() < 15.0, "Start {off:.3} ms from the bar line");
    assert_eq!(
        bytes[fa + 1].byte,
        F8,
        "Start comes with the downbeat's clock"
    );
    // Clocks ran while stopped (the default), and the stop's own clock came with it.
    assert!(find(&bytes[fc..fa], F8).len() > 10);

    // A tempo change, a bar after the start.
    std::thread::sleep(Duration::from_millis(500));
    client.send_json(&json!({"event": "setBpm", "data": 150}));
    let changed = loop {
        let tl = next_timeline(&mut client);
        if tl["data"]["bpm"] == 150 {
            break tl;
        }
    };
    let anchor = changed["data"]["count"].as_u64().unwrap();
    // The change lands a lead (at least 150 ms) ahead, then 30 clocks at 150 BPM take 500 ms.
    std::thread::sleep(Duration::from_millis(1200));
    let bytes = pty.bytes();
    // The k-th clock from Start is clock 6·start_count + k; the anchor's is 6·anchor.
    let clocks: Vec<&Byte> = bytes[fa..].iter().filter(|b| b.byte == F8).collect();
    let k = usize::try_from((anchor - start_count) * 6).unwrap();
    assert!(
        clocks.len() > k + 30,
        "{} clocks, need {}",
        clocks.len(),
        k + 30
    );
    let off = (clocks[k].at_ns - tick_ns(&changed, anchor)) as f64 / 1e6;
    assert!(
        off.abs() < 15.0,
        "the anchor's clock {off:.3} ms from its tick"
    );
    let after = median(
        clocks[k..k + 30]
            .windows(2)
            .map(|w| (w[1].at_ns - w[0].at_ns) as f64)
            .collect(),
    );
    let before = median(
        clocks[k - 30..k - 6]
            .windows(2)
            .map(|w| (w[1].at_ns - w[0].at_ns) as f64)
            .collect(),
    );
    assert!(
        (after / 1e6 - 60_000.0 / (150.0 * 24.0)).abs() < 1.0,
        "{after}"
    );
    assert!((before - CLOCK_120).abs() < 1e6, "{before}");
}

fn decode(bytes: &[u8]) -> OscPacket {
    rosc::decoder::decode_udp(bytes).expect("valid OSC").1
}

/// (address, args) of a message.
fn message(p: &OscPacket) -> (String, Vec<OscType>) {
    match p {
        OscPacket::Message(m) => (m.addr.clone(), m.args.clone()),
        OscPacket::Bundle(_) => panic!("unexpected bundle"),
    }
}

fn int(v: &OscType) -> i64 {
    match v {
        OscType::Int(i) => i64::from(*i),
        other => panic!("not an int: {other:?}"),
    }
}

#[test]
fn osc_messages_follow_the_ticks_and_bundles_carry_their_instant() {
    let server = Server::start(&["--bpm", "120"]);
    let mut client = server.ws();
    let timeline = next_timeline(&mut client);
    let plain = OscReceiver::bind();
    let bundled = OscReceiver::bind();
    let url = url(&server);
    let (plain_addr, bundled_addr) = (plain.addr(), bundled.addr());
    let _a = Bridge::start(&[
        &url,
        "--osc",
        &plain_addr,
        "--rt-priority",
        "0",
        "--no-mlock",
    ]);
    let _b = Bridge::start(&[
        &url,
        "--osc",
        &bundled_addr,
        "--latency-ms",
        "7",
        "--osc-bundles",
        "--osc-ahead-ms",
        "200",
        "--rt-priority",
        "0",
        "--no-mlock",
    ]);
    let got = plain.collect_for(Duration::from_secs(3));
    let messages: Vec<(i64, String, Vec<OscType>)> = got
        .iter()
        .map(|d| {
            let (addr, args) = message(&decode(&d.bytes));
            (d.at_ns, addr, args)
        })
        .collect();
    // Joining: transport, then tempo, at once.
    assert_eq!(messages[0].1, "/conductor/transport");
    assert_eq!(messages[0].2[0], OscType::String("playing".into()));
    assert_eq!(messages[1].1, "/conductor/tempo");
    assert_eq!(
        messages[1].2,
        [OscType::Float(120.0), OscType::Int(4), OscType::Int(4)]
    );
    let ticks: Vec<&(i64, String, Vec<OscType>)> = messages
        .iter()
        .filter(|m| m.1 == "/conductor/tick")
        .collect();
    assert!(
        (20..=26).contains(&ticks.len()),
        "{} ticks in 3 s",
        ticks.len()
    );
    let mut devs = Vec::new();
    for pair in ticks.windows(2) {
        assert_eq!(
            int(&pair[1].2[0]),
            int(&pair[0].2[0]) + 1,
            "consecutive counts"
        );
    }
    for t in &ticks {
        let n = int(&t.2[0]) as u64;
        assert_eq!(t.2[1], OscType::Float(120.0));
        devs.push(((t.0 - tick_ns(&timeline, n)) as f64).abs());
    }
    assert!(median(devs) < 3e6, "ticks arrive on their instants");
    // Beats and bars: right before the tick they belong to, with the right numbers.
    for (i, m) in messages.iter().enumerate() {
        if m.1 == "/conductor/beat" {
            let beat = int(&m.2[0]);
            assert_eq!(int(&m.2[1]), beat % 4);
            let tick = messages[i + 1..]
                .iter()
                .find(|m| m.1 == "/conductor/tick")
                .unwrap();
            assert_eq!(int(&tick.2[0]), beat * 4);
        }
        if m.1 == "/conductor/bar" {
            let next = &messages[i + 1];
            assert_eq!(next.1, "/conductor/beat");
            assert_eq!(int(&next.2[0]), int(&m.2[0]) * 4);
        }
    }

    // Bundles: one per tick, each timetagged with its tick's instant less the 7 ms nudge,
    // arriving about 200 ms before it.
    let got = bundled.collect_for(Duration::from_secs(2));
    let mut checked = 0;
    for d in &got {
        let OscPacket::Bundle(b) = decode(&d.bytes) else {
            panic!("a plain message from the bundling bridge");
        };
        let Some((_, args)) = b
            .content
            .iter()
            .map(message)
            .find(|(addr, _)| addr == "/conductor/tick")
        else {
            continue;
        };
        let n = int(&args[0]) as u64;
        let tag_ns = (i64::from(b.timetag.seconds) - 2_208_988_800) * 1_000_000_000
            + ((u64::from(b.timetag.fractional) * 1_000_000_000) >> 32) as i64;
        let want = tick_ns(&timeline, n) - 7_000_000;
        assert!(
            ((tag_ns - want) as f64).abs() < 2e6,
            "timetag {:.3} ms from the tick's instant less the nudge",
            (tag_ns - want) as f64 / 1e6
        );
        let ahead = (tag_ns - d.at_ns) as f64 / 1e6;
        assert!((170.0..230.0).contains(&ahead), "sent {ahead:.1} ms ahead");
        checked += 1;
    }
    assert!(checked >= 12, "{checked} tick bundles");
}

/// The server on a fixed port (tests/common's `Server` always asks for a free one).
struct FixedServer(std::process::Child);

impl FixedServer {
    fn start(port: u16) -> FixedServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new(common::bin())
            // No state file: the restarted server must count from 0 again (a relocation).
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--state",
                "none",
            ])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn conductor");
        let mut banner = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut banner)
            .expect("banner");
        assert!(banner.contains(&format!(":{port}/")), "{banner}");
        FixedServer(child)
    }
}

impl Drop for FixedServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn losing_the_server_keeps_the_clock_and_says_so_once() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = FixedServer::start(port);
    let pty = Pty::open();
    let path = pty.path_str();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let bridge = Bridge::start(&[
        &url,
        "--midi-device",
        &path,
        "--rt-priority",
        "0",
        "--no-mlock",
    ]);
    bridge.wait_for_line("synced", Duration::from_secs(10));
    pty.wait_until(Duration::from_secs(5), "Continue", |b| {
        !find(b, FB).is_empty()
    });
    drop(server);
    let lost_at = harness::unix_ns();
    bridge.wait_for_line("lost the server", Duration::from_secs(10));
    // Several reconnection attempts pass.
    std::thread::sleep(Duration::from_secs(3));
    let lost_lines = bridge
        .lines()
        .iter()
        .filter(|l| l.contains("lost the server"))
        .count();
    assert_eq!(
        lost_lines,
        1,
        "one line, not one per retry: {:#?}",
        bridge.lines()
    );
    // The clock ran on, on the last timeline, without a gap or a stop.
    let bytes = pty.bytes();
    let during: Vec<&Byte> = bytes
        .iter()
        .filter(|b| b.at_ns > lost_at && b.byte == F8)
        .collect();
    assert!(during.len() > 100, "{} clocks in 3 s", during.len());
    let worst = during
        .windows(2)
        .map(|w| w[1].at_ns - w[0].at_ns)
        .max()
        .unwrap();
    assert!(worst < 60_000_000, "a {:.1} ms gap", worst as f64 / 1e6);
    assert!(
        bytes
            .iter()
            .filter(|b| b.at_ns > lost_at)
            .all(|b| b.byte == F8)
    );

    // The server comes back on the same port, counting from 0 again: the bridge says so and
    // relocates the device (Stop, Song Position, Continue).
    let _server = FixedServer::start(port);
    let since = pty.bytes().len();
    bridge.wait_for_line("server back", Duration::from_secs(15));
    pty.wait_until(Duration::from_secs(5), "relocation", |b| {
        b.len() > since && find(&b[since..], FB).len() == 1
    });
    let bytes = pty.bytes();
    let tail = &bytes[since..];
    let fc = find(tail, FC);
    let f2 = find(tail, F2);
    assert_eq!(
        fc.len(),
        1,
        "{:02X?}",
        tail.iter().map(|b| b.byte).collect::<Vec<_>>()
    );
    assert!(fc[0] + 1 == f2[0], "Stop, then Song Position");
}

#[test]
fn sigterm_stops_the_device_and_exits_cleanly() {
    let server = Server::start(&[]);
    let pty = Pty::open();
    let mut bridge = bridge_on(&server, &pty, &[]);
    pty.wait_until(Duration::from_secs(10), "Continue", |b| {
        !find(b, FB).is_empty()
    });
    assert_eq!(bridge.terminate(), Some(0));
    let bytes = pty.bytes();
    assert_eq!(bytes.last().unwrap().byte, FC, "the device is told to stop");
    bridge.wait_for_line("sent", Duration::from_secs(2));
}

#[test]
fn bad_values_get_one_line_and_status_2() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["http://h/ws", "--osc", "127.0.0.1:9000"],
            "not a conductor endpoint",
        ),
        (&["ws://h/ws"], "no outputs"),
        (&["ws://h/ws", "--osc", "nohost"], "not HOST:PORT"),
        (
            &["ws://h/ws", "--osc", "127.0.0.1:9000", "--latency-ms", "x"],
            "latency",
        ),
        (
            &["ws://h/ws", "--midi-device", "/nonexistent/midi"],
            "/nonexistent/midi",
        ),
        (
            &[
                "ws://h/ws",
                "--osc",
                "127.0.0.1:9000",
                "--rt-priority",
                "120",
            ],
            "rt-priority",
        ),
        (
            &["ws://h/ws", "--osc", "127.0.0.1:9000", "--bogus"],
            "--bogus",
        ),
        (&["--osc", "127.0.0.1:9000"], "URL"),
    ];
    for (args, says) in cases {
        let (status, _, stderr) = run(args);
        assert_eq!(status, Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("conductor-bridge: "), "{stderr}");
        assert!(lines[0].contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let (status, stdout, _) = run(&["--help"]);
    assert_eq!(status, Some(0));
    for env in [
        "CONDUCTOR_URL",
        "CONDUCTOR_TOKEN",
        "CONDUCTOR_BRIDGE_MIDI_PORT",
        "CONDUCTOR_BRIDGE_MIDI_DEVICE",
        "CONDUCTOR_BRIDGE_OSC",
        "CONDUCTOR_BRIDGE_OSC_BUNDLES",
        "CONDUCTOR_BRIDGE_OSC_AHEAD_MS",
        "CONDUCTOR_BRIDGE_LATENCY_MS",
        "CONDUCTOR_BRIDGE_NO_STOPPED_CLOCK",
        "CONDUCTOR_BRIDGE_RT_PRIORITY",
        "CONDUCTOR_BRIDGE_SPIN_US",
        "CONDUCTOR_BRIDGE_NO_MLOCK",
    ] {
        assert!(stdout.contains(env), "--help lacks {env}:\n{stdout}");
    }
}

/// The ALSA sequencer: where `/dev/snd/seq` exists, a virtual port carries the clock to a
/// reader connected with midir; where it does not, the bridge says so plainly (next test) and
/// this test fails unless the skip is asked for explicitly.
#[test]
fn alsa_virtual_port_carries_the_clock() {
    if !std::path::Path::new("/dev/snd/seq").exists() {
        let need = common::require::missing(
            "alsa",
            "/dev/snd/seq (this kernel has no ALSA sequencer)",
            "modprobe snd-seq; a VM without sound modules cannot have it, and the pty tests \
             cover MIDI there",
        );
        if !need {
            return;
        }
    }
    alsa::virtual_port_carries_the_clock();
}

#[test]
fn midi_port_without_a_sequencer_says_so_plainly() {
    if std::path::Path::new("/dev/snd/seq").exists() {
        // The sequencer is there: the port test above covers the working case.
        return;
    }
    let (status, _, stderr) = run(&["ws://127.0.0.1:1/ws", "--midi-port", "conductor-test"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("/dev/snd/seq does not exist"), "{stderr}");
    assert!(stderr.contains("--midi-device"), "{stderr}");
}

mod alsa {
    #[cfg(feature = "alsa")]
    pub fn virtual_port_carries_the_clock() {
        use super::*;
        use std::sync::{Arc, Mutex};
        let server = Server::start(&[]);
        let name = format!("conductor-test-{}", std::process::id());
        let bridge = Bridge::start(&[
            &url(&server),
            "--midi-port",
            &name,
            "--rt-priority",
            "0",
            "--no-mlock",
        ]);
        bridge.wait_for_line("created a virtual one", Duration::from_secs(10));
        let input = midir::MidiInput::new("conductor-test-reader").expect("ALSA input");
        let port = input
            .ports()
            .into_iter()
            .find(|p| input.port_name(p).is_ok_and(|n| n.contains(&name)))
            .expect("the bridge's virtual port is listed");
        let got: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = Arc::clone(&got);
        let mut input = input;
        input.ignore(midir::Ignore::None);
        let _conn = input
            .connect(
                &port,
                "reader",
                move |_, msg, _| sink.lock().unwrap().extend_from_slice(msg),
                (),
            )
            .expect("connect to the virtual port");
        std::thread::sleep(Duration::from_secs(2));
        let bytes = got.lock().unwrap().clone();
        let clocks = bytes.iter().filter(|&&b| b == F8).count();
        assert!(
            (80..=110).contains(&clocks),
            "{clocks} clocks in 2 s at 120 BPM"
        );
    }

    #[cfg(not(feature = "alsa"))]
    pub fn virtual_port_carries_the_clock() {
        panic!(
            "built without the alsa feature: run cargo test -p conductor-bridge (default features)"
        );
    }
}
