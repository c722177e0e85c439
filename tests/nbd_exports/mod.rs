//! Exports for the NBD tests: a [`MemExport`] whose reads call a hook first (to fail or delay
//! them), and one that counts the reads it has in flight.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmicache::nbd::{Export, MemExport, MEM_BLOCK};

const MIB: u64 = 1 << 20;

/// A read-only [`MemExport`] whose reads call a hook first (which may delay or fail them).
pub struct Hooked(pub MemExport, pub fn(u64, usize) -> vmicache::Result<()>);

/// Reads of `flaky` exports fail in `[BAD, BAD + 4 KiB)`, a data block of `pattern`.
pub const BAD: u64 = MIB + 2 * MEM_BLOCK;

pub fn flaky(data: Vec<u8>) -> Hooked {
    Hooked(MemExport::from_vec(data), |offset, len| {
        if offset < BAD + 4096 && BAD < offset + len as u64 {
            let e = std::io::Error::from_raw_os_error(5);
            return Err(vmicache::Error::io("flaky", "read", e));
        }
        Ok(())
    })
}

impl Export for Hooked {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> vmicache::Result<()> {
        (self.1)(offset, buf.len())?;
        self.0.read(buf, offset)
    }
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> vmicache::Result<()> {
        self.0.write(buf, offset, fua)
    }
    fn flush(&self) -> vmicache::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> vmicache::Result<()> {
        self.0.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> vmicache::Result<()> {
        self.0.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> vmicache::Result<Vec<(u64, u32)>> {
        self.0.block_status(offset, len)
    }
}

/// How long a [`Gathering`] export's reads wait for the others.
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(30);

/// A read-only [`MemExport`] whose reads wait until `want` reads are in flight at once (or
/// [`GATHER_TIMEOUT`] after the first read, when they give up waiting), and which records the
/// most reads it saw in flight at once.
pub struct Gathering {
    mem: MemExport,
    want: usize,
    state: Mutex<InFlight>,
    changed: Condvar,
}

#[derive(Default)]
struct InFlight {
    now: usize,
    most: usize,
    deadline: Option<Instant>,
}

impl Gathering {
    pub fn new(mem: MemExport, want: usize) -> Gathering {
        Gathering {
            mem,
            want,
            state: Mutex::new(InFlight::default()),
            changed: Condvar::new(),
        }
    }

    pub fn most_in_flight(&self) -> usize {
        self.state.lock().unwrap().most
    }

    /// One read's turn: counted in flight until the wanted number were in flight at once.
    fn gather(&self) {
        let mut g = self.state.lock().unwrap();
        g.now += 1;
        g.most = g.most.max(g.now);
        self.changed.notify_all();
        let deadline = *g
            .deadline
            .get_or_insert_with(|| Instant::now() + GATHER_TIMEOUT);
        while g.most < self.want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.changed.wait_timeout(g, left).unwrap().0;
        }
        g.now -= 1;
    }
}

impl Export for Gathering {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> vmicache::Result<()> {
        self.gather();
        self.mem.read(buf, offset)
    }
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> vmicache::Result<()> {
        self.mem.write(buf, offset, fua)
    }
    fn flush(&self) -> vmicache::Result<()> {
        self.mem.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> vmicache::Result<()> {
        self.mem.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> vmicache::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> vmicache::Result<Vec<(u64, u32)>> {
        self.mem.block_status(offset, len)
    }
}
