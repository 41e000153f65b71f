//! What a conductor-sync client takes from the network: arbitrary text as a server's `timeline`
//! or `transport` event, and arbitrary numbers as ping/pong stamps. Nothing may panic or
//! overflow, tick arithmetic must stay monotonic, and a mapping must invert.
#![no_main]

use conductor_sync::{ClockSync, Timeline, Transport};
use libfuzzer_sys::fuzz_target;

fn i64_at(data: &[u8], i: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[i..i + 8]);
    i64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // `#` and then 32-byte records: four stamps each (t0, t1, t2, t3), as raw i64 ns.
    if let Some(stamps) = data.strip_prefix(b"#") {
        let mut sync = ClockSync::default();
        for rec in stamps.chunks_exact(32) {
            let t = [0, 8, 16, 24].map(|i| i64_at(rec, i));
            if let Some(m) = sync.add_sample(t[0], t[1], t[2], t[3]) {
                let s = m.to_server(t[3]);
                let _ = m.to_local(s);
                assert!(m.to_server(t[3].saturating_add(1_000_000)) >= s || t[3] > i64::MAX - 2_000_000);
            }
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let _ = Transport::from_event(&value);
    let Ok(t) = Timeline::from_event(&value) else {
        return;
    };
    let t = t.followed_by(t);
    let a = t.anchor_count();
    for n in [0, 1, a.saturating_sub(1), a, a.saturating_add(1), u64::MAX / 2, u64::MAX] {
        let at = t.tick_time_ns(n);
        let _ = t.plays(n);
        if n < u64::MAX {
            assert!(t.tick_time_ns(n + 1) >= at, "tick {n} after the next");
        }
        let _ = t.first_count_at_or_after(at);
    }
    for ns in [i64::MIN, -1, 0, 1, i64::MAX] {
        let _ = t.first_count_at_or_after(ns);
    }
    let _ = t.with_transport(t.transport());
});
