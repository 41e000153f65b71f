//! `conductor healthcheck`: asks a running server for `GET /healthz` and says whether it
//! answered 200.
//!
//! Part of the binary, not the library. It exists because the container image is `FROM scratch`:
//! there is no curl or wget to put in a `HEALTHCHECK`. One plain HTTP/1.1 request over a std
//! `TcpStream` to an IP address, so no DNS and no files are needed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The status line is all we read; a server that sends more than this before it is not HTTP.
const MAX_STATUS_LINE: usize = 256;

/// Checks `addr` within `timeout` for connecting, and again for the answer. `Ok(())` when the
/// answer is `200`; otherwise a one-line reason.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    // A health check that waits longer than an hour is a typo; bounding it also keeps
    // `Instant + timeout` below from overflowing.
    let timeout = timeout.clamp(Duration::from_millis(1), Duration::from_secs(3600));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| format!("cannot send the request to {addr}: {e}"))?;
    let line = read_status_line(&mut stream, timeout)
        .map_err(|e| format!("no answer from {addr}: {e}"))?;
    match status_code(&line) {
        Some(200) => Ok(()),
        Some(_) => Err(format!("{addr} answered {line:?}")),
        None => Err(format!("{addr} did not answer HTTP: {line:?}")),
    }
}

/// Reads up to the first CRLF, all within `timeout` in total.
fn read_status_line(stream: &mut TcpStream, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(MAX_STATUS_LINE);
    let mut chunk = [0u8; 128];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(0) => return Ok(String::from_utf8_lossy(&buf).into_owned()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The code of an `HTTP/1.x NNN reason` status line.
fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A one-connection server that reads the request head and answers `reply`.
    fn serve_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            assert!(head.starts_with(b"GET /healthz HTTP/1.1\r\n"));
            let _ = s.write_all(reply);
        });
        addr
    }

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn ok_only_on_200() {
        assert_eq!(
            check(
                serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
                T
            ),
            Ok(())
        );
        let err = check(
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\ndegraded"),
            T,
        )
        .unwrap_err();
        assert!(err.contains("503"), "{err}");
        let err = check(serve_once(b"SSH-2.0-OpenSSH\r\n"), T).unwrap_err();
        assert!(err.contains("did not answer HTTP"), "{err}");
        let err = check(serve_once(b""), T).unwrap_err();
        assert!(err.contains("no answer"), "{err}");
    }

    #[test]
    fn nothing_listening_fails_fast() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let started = Instant::now();
        let err = check(addr, T).unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
        assert!(started.elapsed() < T);
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let err = check(addr, Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.0 404 Not Found"), Some(404));
        assert_eq!(status_code("HTTP/2 200"), None);
        assert_eq!(status_code("HTTP/1.1 2000 OK"), None);
        assert_eq!(status_code(""), None);
    }
}
