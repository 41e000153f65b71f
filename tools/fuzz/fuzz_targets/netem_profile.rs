//! A `--path` profile as a user types it: parsing must never panic, and a parsed profile's delay
//! lines must never let a chunk overtake the one ahead of it.
#![no_main]

use conductor_netem::Profile;
use conductor_netem::delay::DelayLine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Profile::parse(text) else {
        return;
    };
    let _ = p.to_string();
    for dir in [p.up, p.down] {
        let mut line = DelayLine::new(dir, data.len() as u64);
        let mut last = 0;
        for i in 0..64u64 {
            let d = line.departure(i * 3_000_000);
            assert!(d >= last && d >= i * 3_000_000);
            last = d;
        }
    }
});
