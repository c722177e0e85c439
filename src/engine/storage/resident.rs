//! Whether file ranges are in the page cache: what may be sent from there with `sendfile(2)`
//! at once, and what must be read first.

use std::fs::File;

/// Whether every page of `len` bytes of `file` at `off` is in the page cache (`cachestat(2)`,
/// Linux 6.5; false where the kernel cannot say).
pub fn resident(file: &File, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// cachestat's number, the same on every architecture (added in Linux 6.5); the libc
    /// crate does not name it yet.
    const SYS_CACHESTAT: nix::libc::c_long = 451;
    if len == 0 {
        return true;
    }
    let page = 4096u64;
    let first = off / page;
    let pages = (off + len).div_ceil(page) - first;
    let range = Range {
        off: first * page,
        len: pages * page,
    };
    let mut st = Stat::default();
    // SAFETY: the descriptor is open for the call; `range` and `st` are valid, properly laid
    // out (the kernel's struct cachestat_range and struct cachestat) and live across it.
    let r = unsafe {
        nix::libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    r == 0 && st.nr_cache >= pages
}
