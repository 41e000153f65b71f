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
        // musl's sched_param has more fields than glibc's (unused for SCHED_FIFO): zero them.
        // SAFETY: sched_param is plain integers, for which all-zero bytes are valid.
        let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
        param.sched_priority = priority;
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
///
/// Without `CAP_IPC_LOCK` the kernel still allows locking up to `RLIMIT_MEMLOCK` (often 8 MiB),
/// but with `MCL_FUTURE` every allocation past that limit then fails, and the process aborts
/// once it has a few thousand clients. So memory is locked only with the capability or an
/// unlimited `RLIMIT_MEMLOCK` (the soft limit is raised to the hard one first).
pub fn lock_memory() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if !has_effective_capability(CAP_IPC_LOCK) {
            let limit = raise_memlock_limit()?;
            if limit != libc::RLIM_INFINITY {
                return Err(io::Error::other(format!(
                    "RLIMIT_MEMLOCK is {} KiB and past it every allocation would fail",
                    limit / 1024
                )));
            }
        }
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

/// `CAP_IPC_LOCK` from `<linux/capability.h>`: lock memory past `RLIMIT_MEMLOCK`.
#[cfg(target_os = "linux")]
const CAP_IPC_LOCK: u32 = 14;

/// Whether capability number `cap` is in the calling thread's effective set (`capget(2)`).
#[cfg(target_os = "linux")]
fn has_effective_capability(cap: u32) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: 64-bit sets, as two 32-bit halves.
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes one header and two data structs, both ours and of the layout the
    // version names.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    rc == 0
        && data
            .get((cap / 32) as usize)
            .is_some_and(|d| d.effective & (1 << (cap % 32)) != 0)
}

/// Raises the soft limit on locked memory to the hard limit and returns it.
#[cfg(target_os = "linux")]
fn raise_memlock_limit() -> io::Result<libc::rlim_t> {
    // SAFETY: getrlimit/setrlimit read and write a local struct only.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur != lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(lim.rlim_cur)
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn capabilities_match_the_kernel_view() {
        // /proc/self/status lists the effective set as hex: bit 14 is CAP_IPC_LOCK.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(
            has_effective_capability(CAP_IPC_LOCK),
            eff & (1 << CAP_IPC_LOCK) != 0
        );
        assert!(!has_effective_capability(200));
    }
}
