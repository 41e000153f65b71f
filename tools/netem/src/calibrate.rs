//! How much the emulator itself adds: round trips through a path with a fixed delay, against
//! the same round trips direct, to an echo server in this process.
//!
//! This module owns that measurement. A path of delay D adds 2·D to a round trip by design;
//! whatever it adds beyond that (a late wake-up, a busy core, the copy) is the emulator's own
//! error, which `conductor-netem calibrate` reports so that users can judge a set-up by it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::NetemError;
use crate::profile::Profile;
use crate::proxy::{self, PathConfig};

/// One delay's result: the added round-trip error, µs, over `samples` round trips.
#[derive(Clone, Debug)]
pub struct Calibration {
    pub delay: Duration,
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

fn echo_server() -> Result<SocketAddr, NetemError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| NetemError::Io(e.to_string()))?;
    let addr = l.local_addr().map_err(|e| NetemError::Io(e.to_string()))?;
    thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Both);
            });
        }
    });
    Ok(addr)
}

/// Round trips of a 64-byte message to `addr`, `count` of them `interval` apart, µs.
fn round_trips(addr: SocketAddr, count: usize, interval: Duration) -> Result<Vec<f64>, NetemError> {
    let io = |e: std::io::Error| NetemError::Io(e.to_string());
    let mut s = TcpStream::connect(addr).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t0 = Instant::now();
        s.write_all(&msg).map_err(io)?;
        s.read_exact(&mut back).map_err(io)?;
        out.push(t0.elapsed().as_secs_f64() * 1e6);
        thread::sleep(interval);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Measures the emulator's own error at each delay, against the direct round trip's median.
pub fn calibrate(
    delays: &[Duration],
    count: usize,
    interval: Duration,
    spin: Duration,
    rt_priority: u8,
) -> Result<(f64, Vec<Calibration>), NetemError> {
    let echo = echo_server()?;
    let mut direct = round_trips(echo, count, interval)?;
    direct.sort_by(f64::total_cmp);
    let base = percentile(&direct, 0.5);
    let mut rows = Vec::new();
    for (i, &delay) in delays.iter().enumerate() {
        let path = proxy::spawn(PathConfig {
            listen: "127.0.0.1:0"
                .parse()
                .map_err(|_| NetemError::Io("addr".into()))?,
            upstream: echo.to_string(),
            profile: Profile::symmetric(delay.as_secs_f64() * 1000.0, 0.0),
            seed: i as u64,
            spin,
            rt_priority,
            name: "calibrate".into(),
        })?;
        let mut added: Vec<f64> = round_trips(path.local_addr(), count, interval)?
            .into_iter()
            .map(|rtt| rtt - base - 2.0 * delay.as_secs_f64() * 1e6)
            .collect();
        added.sort_by(f64::total_cmp);
        rows.push(Calibration {
            delay,
            samples: added.len(),
            p50_us: percentile(&added, 0.5),
            p99_us: percentile(&added, 0.99),
            max_us: percentile(&added, 1.0),
        });
    }
    Ok((base, rows))
}
