//! MIDI outputs: raw bytes to a device file, or an ALSA sequencer port through `midir`.
//!
//! This module owns opening the devices and writing bytes to them. It decides nothing about
//! timing. [`MidiSink::send`] is on the emitter's emit path: it must not allocate, lock or log;
//! it writes and reports the outcome.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use thiserror::Error;

/// Why an output could not be opened, with what to do about it.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("{path}: {source}; check the path and that this user may write to it")]
    Device { path: String, source: io::Error },
    #[error(
        "ALSA sequencer unavailable ({0}): /dev/snd/seq does not exist on this machine; load the \
         snd-seq module (modprobe snd-seq) or use --midi-device"
    )]
    NoSequencer(String),
    #[error(
        "MIDI port {name:?} matches several ports ({candidates}); give its client:port address"
    )]
    Ambiguous { name: String, candidates: String },
    #[error("MIDI port {name:?}: {reason}")]
    Port { name: String, reason: String },
    #[error("this build has no ALSA support (built without the `alsa` feature); use --midi-device")]
    NoAlsaSupport,
}

/// Why a write failed. The emitter counts these; `main` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The device's buffer is full (nobody reads, or a slow serial line): the bytes are lost.
    Full,
    /// An OS error (errno), e.g. EIO when a USB device was unplugged.
    Os(i32),
    /// The ALSA sequencer refused the event.
    Sequencer,
}

/// One MIDI output, ready to write.
pub enum MidiSink {
    Device(RawDevice),
    #[cfg(feature = "alsa")]
    Port(Box<midir::MidiOutputConnection>),
}

impl MidiSink {
    /// Writes `bytes` (whole messages) at once.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        match self {
            MidiSink::Device(d) => d.send(bytes),
            #[cfg(feature = "alsa")]
            MidiSink::Port(port) => {
                // The sequencer takes one message per event.
                for message in messages(bytes) {
                    port.send(message).map_err(|_| SendError::Sequencer)?;
                }
                Ok(())
            }
        }
    }
}

/// Splits a run of system real-time and common messages into single messages: Song Position
/// Pointer takes two data bytes, the others none.
pub fn messages(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = if rest[0] == crate::midi_plan::SONG_POSITION {
            3.min(rest.len())
        } else {
            1
        };
        let (message, tail) = rest.split_at(len);
        rest = tail;
        Some(message)
    })
}

/// A device file written with `write(2)`: a raw MIDI device, a serial adapter, a pty.
pub struct RawDevice {
    file: File,
}

impl RawDevice {
    /// Opens `path` for writing without blocking (a full device drops bytes rather than stall
    /// every other output). A terminal (a serial adapter, a pty) is put in raw mode, so that
    /// no byte is translated: a Song Position Pointer's data byte may be 0x0A, which a
    /// terminal would otherwise turn into CR LF.
    pub fn open(path: &Path) -> Result<RawDevice, OpenError> {
        let err = |source| OpenError::Device {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .map_err(err)?;
        let fd = file.as_raw_fd();
        // SAFETY: isatty, tcgetattr, cfmakeraw and tcsetattr read and write a local termios
        // struct and the descriptor we own.
        unsafe {
            if libc::isatty(fd) == 1 {
                let mut tio: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(fd, &mut tio) != 0 {
                    return Err(err(io::Error::last_os_error()));
                }
                libc::cfmakeraw(&mut tio);
                if libc::tcsetattr(fd, libc::TCSANOW, &tio) != 0 {
                    return Err(err(io::Error::last_os_error()));
                }
            }
        }
        Ok(RawDevice { file })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        match self.file.write(bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            // A partial write of a few bytes: the device is full.
            Ok(_) => Err(SendError::Full),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(SendError::Full),
            Err(e) => Err(SendError::Os(e.raw_os_error().unwrap_or(0))),
        }
    }
}

/// How an ALSA port was opened, for the one line `main` logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// Connected to an existing port (its full name).
    Connected(String),
    /// Created a virtual port other programs connect to.
    Virtual,
}

/// The ALSA client name other programs see (`aconnect -l`).
#[cfg(feature = "alsa")]
const CLIENT_NAME: &str = "conductor-bridge";

/// Opens `--midi-port NAME`: the existing output port that NAME names, else a virtual port
/// called NAME.
///
/// NAME names a port when it equals its address (`20:0`), its port name, its client name, or
/// midir's full `client:port c:p` name. Several matches are an error (give the address): a
/// guess could drive the wrong device.
#[cfg(feature = "alsa")]
pub fn open_port(name: &str) -> Result<(MidiSink, PortKind), OpenError> {
    let out = midir::MidiOutput::new(CLIENT_NAME).map_err(|e| sequencer_error(&e))?;
    let ports = out.ports();
    let named: Vec<(midir::MidiOutputPort, String)> = ports
        .into_iter()
        .filter_map(|p| out.port_name(&p).ok().map(|n| (p, n)))
        .collect();
    let mut hits: Vec<&(midir::MidiOutputPort, String)> = named
        .iter()
        .filter(|(_, full)| port_matches(full, name))
        .collect();
    match hits.len() {
        0 => {
            use midir::os::unix::VirtualOutput;
            let conn = out.create_virtual(name).map_err(|e| OpenError::Port {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
            Ok((MidiSink::Port(Box::new(conn)), PortKind::Virtual))
        }
        1 => {
            let (port, full) = hits.remove(0);
            let conn = out
                .connect(port, "clock out")
                .map_err(|e| OpenError::Port {
                    name: name.to_string(),
                    reason: e.to_string(),
                })?;
            Ok((
                MidiSink::Port(Box::new(conn)),
                PortKind::Connected(full.clone()),
            ))
        }
        _ => Err(OpenError::Ambiguous {
            name: name.to_string(),
            candidates: hits
                .iter()
                .map(|(_, n)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(not(feature = "alsa"))]
pub fn open_port(_name: &str) -> Result<(MidiSink, PortKind), OpenError> {
    Err(OpenError::NoAlsaSupport)
}

/// The ALSA ports `--midi-port` can connect to, by midir's full name.
#[cfg(feature = "alsa")]
pub fn list_ports() -> Result<Vec<String>, OpenError> {
    let out = midir::MidiOutput::new(CLIENT_NAME).map_err(|e| sequencer_error(&e))?;
    Ok(out
        .ports()
        .iter()
        .filter_map(|p| out.port_name(p).ok())
        .collect())
}

#[cfg(not(feature = "alsa"))]
pub fn list_ports() -> Result<Vec<String>, OpenError> {
    Err(OpenError::NoAlsaSupport)
}

#[cfg(feature = "alsa")]
fn sequencer_error(e: &midir::InitError) -> OpenError {
    if Path::new("/dev/snd/seq").exists() {
        OpenError::Port {
            name: CLIENT_NAME.to_string(),
            reason: format!(
                "the ALSA sequencer refused a client ({e}); check /dev/snd/seq's permissions (the audio group)"
            ),
        }
    } else {
        OpenError::NoSequencer(e.to_string())
    }
}

/// Whether midir's full port name (`Client:Port c:p`) is named by `name`.
pub fn port_matches(full: &str, name: &str) -> bool {
    if full == name {
        return true;
    }
    // "Client Name:Port Name 20:0": the address is the last word; client and port names may
    // contain spaces and colons of their own, so split from the end.
    let Some((names, address)) = full.rsplit_once(' ') else {
        return false;
    };
    if address == name {
        return true;
    }
    // The client name is what precedes the first ':' that is followed by the port name; ALSA
    // names rarely contain ':', so the first one is taken.
    match names.split_once(':') {
        Some((client, port)) => client == name || port == name,
        None => names == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_into_messages() {
        let got: Vec<&[u8]> = messages(&[0xFC, 0xF2, 44, 2, 0xFB, 0xF8]).collect();
        assert_eq!(got, [&[0xFC][..], &[0xF2, 44, 2], &[0xFB], &[0xF8]]);
        assert_eq!(messages(&[]).count(), 0);
    }

    #[test]
    fn port_names_match_by_address_port_client_or_whole() {
        let full = "MicroFreak:MicroFreak MIDI 1 24:0";
        assert!(port_matches(full, "24:0"));
        assert!(port_matches(full, "MicroFreak"));
        assert!(port_matches(full, "MicroFreak MIDI 1"));
        assert!(port_matches(full, full));
        assert!(!port_matches(full, "24:1"));
        assert!(!port_matches(full, "Micro"));
        assert!(port_matches(
            "Midi Through:Midi Through Port-0 14:0",
            "Midi Through"
        ));
    }

    #[test]
    fn a_pty_is_put_in_raw_mode_and_bytes_pass_unchanged() {
        use std::io::Read;
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a descriptor we own.
        let (master, slave) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(fd >= 0);
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(fd))
                .to_string_lossy()
                .into_owned();
            (
                <File as std::os::fd::FromRawFd>::from_raw_fd(fd),
                std::path::PathBuf::from(name),
            )
        };
        let mut dev = RawDevice::open(&slave).unwrap();
        // 0x0A would become 0x0D 0x0A on a terminal in its default (cooked) mode.
        dev.send(&[0xFC, 0xF2, 0x0A, 0x00, 0xF8]).unwrap();
        let mut master = master;
        let mut buf = [0u8; 16];
        let n = master.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], [0xFC, 0xF2, 0x0A, 0x00, 0xF8]);
        let missing = RawDevice::open(Path::new("/nonexistent/midi"))
            .err()
            .unwrap();
        assert!(
            missing.to_string().contains("/nonexistent/midi"),
            "{missing}"
        );
    }
}
