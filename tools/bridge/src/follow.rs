//! The bridge's side of the sync library: its timeline read through [`TimelineView`].

#[cfg(test)]
pub(crate) mod tests_support {
    //! Timelines for the plans' unit tests. STAND-IN until conductor-sync lands: then these
    //! build the server's `timeline` event and parse it with `Timeline::from_event`.
    use crate::grid::TimelineView;

    #[derive(Clone, Copy, Debug)]
    pub struct Fake {
        bpm_milli: u64,
        ppqn: u32,
        bpb: u32,
        anchor_count: u64,
        anchor_ns: i64,
        playing: bool,
        from: u64,
    }

    const S: i128 = 60_000_000_000 * 1000;

    impl TimelineView for Fake {
        fn tick_time_ns(&self, count: u64) -> i64 {
            let d = i128::from(self.bpm_milli) * i128::from(self.ppqn);
            let k = i128::from(count) - i128::from(self.anchor_count);
            (i128::from(self.anchor_ns) + (k * S).div_euclid(d)) as i64
        }
        fn first_count_at_or_after(&self, server_ns: i64) -> u64 {
            let d = i128::from(self.bpm_milli) * i128::from(self.ppqn);
            let x = i128::from(server_ns) - i128::from(self.anchor_ns);
            let k = (x * d + S - 1).div_euclid(S);
            (i128::from(self.anchor_count) + k).max(0) as u64
        }
        fn plays(&self, count: u64) -> bool {
            if count >= self.from {
                self.playing
            } else {
                !self.playing || self.from == 0
            }
        }
        fn ppqn(&self) -> u32 {
            self.ppqn
        }
        fn beats_per_bar(&self) -> u32 {
            self.bpb
        }
        fn bpm(&self) -> f64 {
            self.bpm_milli as f64 / 1000.0
        }
        fn anchor_count(&self) -> u64 {
            self.anchor_count
        }
        fn transport_from(&self) -> u64 {
            self.from
        }
        fn transport_playing(&self) -> bool {
            self.playing
        }
    }

    /// Tick `anchor_count` at `anchor_ns` (whole µs, as the event carries), 4/4, the transport
    /// `playing` (or not) from count `from`, the opposite before it.
    pub fn timeline(
        bpm: f64,
        ppqn: u32,
        anchor_count: u64,
        anchor_ns: i64,
        playing: bool,
        from: u64,
    ) -> Fake {
        Fake {
            bpm_milli: (bpm * 1000.0).round() as u64,
            ppqn,
            bpb: 4,
            anchor_count,
            anchor_ns: anchor_ns / 1000 * 1000,
            playing,
            from,
        }
    }

    /// Count 0 at a fixed instant, with `bpb` beats in a bar.
    pub fn timeline_bars(bpm: f64, ppqn: u32, bpb: u32, playing: bool, from: u64) -> Fake {
        Fake {
            bpb,
            ..timeline(bpm, ppqn, 0, 1_700_000_000_000_000_000, playing, from)
        }
    }
}
