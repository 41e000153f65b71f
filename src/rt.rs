//! Real-time privileges for the timing thread, asked of the kernel through `libc`.
//!
//! Everything here is best effort: an unprivileged process gets `EPERM`, and the server runs on
//! without it, a little less steady under load. This module only asks; it never decides what to
//! do on refusal (the caller logs one line and carries on).

use std::io;

/// Puts the calling thread under `SCHED_FIFO` at `priority` (1–99).
pub fn set_fifo_priority(priority: i32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: pthread_self() is always a valid handle for the calling thread, and `param`
        // outlives the call.
        let rc =
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = priority;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Asks for 1 ns of timer slack on the calling thread, so its timed sleeps end when asked
/// rather than up to 50 µs later (the default slack). Less for the final spin to cover.
pub fn set_min_timer_slack() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Locks the process's pages in memory, so that no tick waits on a page fault to disk.
///
/// `MCL_ONFAULT` locks pages as they are touched rather than all at once: reserved but unused
/// memory (thread stacks, allocator arenas) stays out of RSS.
pub fn lock_memory() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: mlockall takes flags only.
        let rc =
            unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Raises the soft limit on open files to the hard limit and returns the new soft limit:
/// every client is a descriptor, and the usual soft default (1024) would cap the server long
/// before memory or CPU do.
pub fn raise_fd_limit() -> io::Result<u64> {
    // SAFETY: getrlimit/setrlimit read and write a local struct only.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(lim.rlim_cur as u64)
    }
}
