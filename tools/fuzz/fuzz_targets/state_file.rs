//! Arbitrary bytes as a state file: reading never panics, and whatever is accepted is within
//! the limits and comes back the same after being written again.
#![no_main]

use conductor::state::{self, Limits};
use conductor::tempo::Bpm;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_764_000_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        min_bpm: Bpm::whole(60),
        max_bpm: Bpm::whole(200),
    };
    if let Ok(saved) = state::decode(data, limits, NOW) {
        let bpm = saved.timeline.bpm();
        assert!(bpm >= limits.min_bpm && bpm <= limits.max_bpm);
        assert!((1..=960).contains(&saved.timeline.ppqn));
        let again = state::decode(&state::encode(&saved, NOW), limits, NOW).expect("re-read");
        assert_eq!(again, saved);
    }
});
