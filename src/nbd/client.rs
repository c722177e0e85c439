//! A small NBD client used as read-only storage: a base image served by a storage node
//! (`nbd+unix:///EXPORT?socket=PATH` as the backing file name, as QEMU writes it).
//!
//! Fixed newstyle handshake with NBD_OPT_GO, simple replies, one request at a time per
//! connection (the connection sits behind a mutex). Reads only: a base is never written.
//!
//! A dead storage node never hangs a reader: connecting and the handshake give up after
//! [`Timeouts::connect`] (5 s by default), each socket read or write of a request after
//! [`Timeouts::io`] (30 s); a failed request drops the connection and the next one connects
//! again.

use super::proto::*;
use crate::engine::storage::{seek_status, FileStatus, Storage};
use crate::format::{be_u16, be_u32, be_u64};
use crate::{Error, Result};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parsed `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub export: String,
    pub socket: PathBuf,
}

impl NbdUri {
    pub fn parse(s: &str) -> Option<NbdUri> {
        let rest = s.strip_prefix("nbd+unix://")?;
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let (export, query) = rest.split_once('?')?;
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        Some(NbdUri {
            export: export.to_string(),
            socket: PathBuf::from(socket),
        })
    }
}

/// How long the client waits for a storage node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and the whole handshake, each time the client (re)connects. Default 5 s.
    pub connect: Duration,
    /// Each read or write on the socket while a request is served. Default 30 s.
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            io: Duration::from_secs(30),
        }
    }
}

/// A read-only NBD export as storage.
#[derive(Debug)]
pub struct NbdStorage {
    name: PathBuf,
    timeouts: Timeouts,
    /// None after an error: the next request connects again (a reply stream that failed
    /// midway cannot be trusted).
    conn: Mutex<Option<UnixStream>>,
    size: u64,
    cookie: Mutex<u64>,
}

/// The shortest socket timeout set (zero means none to the kernel).
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// A Unix socket connection to `path`, waiting at most until `deadline` (a listener whose
/// backlog is full makes a blocking connect wait indefinitely).
fn connect_until(path: &Path, deadline: Instant) -> std::io::Result<UnixStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path)?;
    loop {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let s = UnixStream::from(fd);
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(Errno::EAGAIN | Errno::EINTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Errno::EAGAIN) => return Err(Errno::ETIMEDOUT.into()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Arms `s` so that its next reads and writes give up at `deadline`.
fn arm(s: &UnixStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(nix::errno::Errno::ETIMEDOUT.into());
    }
    s.set_read_timeout(Some(left.max(MIN_TIMEOUT)))?;
    s.set_write_timeout(Some(left.max(MIN_TIMEOUT)))
}

fn rd<const N: usize>(s: &mut UnixStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

impl NbdStorage {
    /// Connect and negotiate with the default [`Timeouts`]; `name` is the URI as recorded
    /// (used in messages).
    pub fn connect(name: &str) -> Result<NbdStorage> {
        Self::connect_with(name, Timeouts::default())
    }

    /// Connect and negotiate, waiting for the storage node at most as `timeouts` say.
    pub fn connect_with(name: &str, timeouts: Timeouts) -> Result<NbdStorage> {
        let (s, size) = Self::handshake(name, timeouts)?;
        Ok(NbdStorage {
            name: PathBuf::from(name),
            timeouts,
            conn: Mutex::new(Some(s)),
            size,
            cookie: Mutex::new(1),
        })
    }

    fn handshake(name: &str, timeouts: Timeouts) -> Result<(UnixStream, u64)> {
        let uri = NbdUri::parse(name).ok_or_else(|| {
            Error::unsupported(name, "NBD URI form (use nbd+unix:///EXPORT?socket=PATH)")
        })?;
        let io = |e: std::io::Error| Error::io(name, "NBD handshake", timed_out(e));
        let bad = |w: &str| Error::invalid(name, format!("NBD server: {w}"));
        let deadline = Instant::now() + timeouts.connect;
        let mut s = connect_until(&uri.socket, deadline)
            .map_err(|e| Error::io(&uri.socket, "connect", e))?;
        arm(&s, deadline).map_err(io)?;
        let hello = rd::<18>(&mut s).map_err(io)?;
        if be_u64(&hello, 0) != NBDMAGIC || be_u64(&hello, 8) != IHAVEOPT {
            return Err(bad("not a newstyle NBD server"));
        }
        let flags = be_u16(&hello, 16);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server lacks fixed newstyle negotiation"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        let mut out = cflags.to_be_bytes().to_vec();
        // NBD_OPT_GO: export name, no information requests.
        let name_b = uri.export.as_bytes();
        let data_len = 4 + name_b.len() + 2;
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&(data_len as u32).to_be_bytes());
        out.extend_from_slice(&(name_b.len() as u32).to_be_bytes());
        out.extend_from_slice(name_b);
        out.extend_from_slice(&0u16.to_be_bytes());
        arm(&s, deadline).map_err(io)?;
        s.write_all(&out).map_err(io)?;
        let mut size = None;
        loop {
            arm(&s, deadline).map_err(io)?;
            let h = rd::<20>(&mut s).map_err(io)?;
            if be_u64(&h, 0) != OPT_REPLY_MAGIC {
                return Err(bad("bad option reply"));
            }
            let ty = be_u32(&h, 12);
            let len = be_u32(&h, 16);
            if len > MAX_OPTION_LEN {
                return Err(bad("option reply too long"));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).map_err(io)?;
            match ty {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && be_u16(&data, 0) == INFO_EXPORT => {
                    size = Some(be_u64(&data, 2));
                }
                REP_INFO => {}
                t if t & REP_ERR != 0 => {
                    let msg = String::from_utf8_lossy(&data);
                    return Err(bad(&format!(
                        "export '{}' refused (error {:#x}{}{})",
                        uri.export,
                        t,
                        if msg.is_empty() { "" } else { ": " },
                        msg
                    )));
                }
                _ => return Err(bad("unexpected option reply")),
            }
        }
        let size = size.ok_or_else(|| bad("no export size in NBD_OPT_GO reply"))?;
        let request_timeout = Some(timeouts.io.max(MIN_TIMEOUT));
        s.set_read_timeout(request_timeout).map_err(io)?;
        s.set_write_timeout(request_timeout).map_err(io)?;
        Ok((s, size))
    }

    fn read_chunk(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let cookie = {
            let mut c = self.cookie.lock().unwrap_or_else(|p| p.into_inner());
            *c += 1;
            *c
        };
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let (s, size) = Self::handshake(&self.name.to_string_lossy(), self.timeouts)?;
            if size != self.size {
                return Err(Error::chain(
                    &self.name,
                    format!("export size changed from {} to {size}", self.size),
                ));
            }
            *guard = Some(s);
        }
        let s = guard.as_mut().expect("connected above");
        let result = Self::request(s, &self.name, cookie, buf, off);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn request(
        s: &mut UnixStream,
        name: &Path,
        cookie: u64,
        buf: &mut [u8],
        off: u64,
    ) -> Result<()> {
        let io = |e: std::io::Error| Error::io(name, "NBD read", timed_out(e));
        let req = Request {
            flags: 0,
            typ: CMD_READ,
            cookie,
            offset: off,
            length: buf.len() as u32,
        };
        s.write_all(&req.encode()).map_err(io)?;
        let r = rd::<16>(s).map_err(io)?;
        if be_u32(&r, 0) != SIMPLE_REPLY_MAGIC || be_u64(&r, 8) != cookie {
            return Err(Error::invalid(name, "NBD server sent a bad reply"));
        }
        let err = be_u32(&r, 4);
        if err != 0 {
            return Err(Error::io(
                name,
                "NBD read",
                std::io::Error::from_raw_os_error(err as i32),
            ));
        }
        s.read_exact(buf).map_err(io)
    }
}

impl Storage for NbdStorage {
    fn path(&self) -> &Path {
        &self.name
    }
    fn len(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let have = self.size.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[have..].fill(0);
        let mut done = 0;
        while done < have {
            let n = (have - done).min(MAX_PAYLOAD as usize);
            self.read_chunk(&mut buf[done..done + n], off + done as u64)?;
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        Err(Error::read_only(&self.name, "an NBD base is read-only"))
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::read_only(&self.name, "an NBD base is read-only"))
    }
    fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        Ok((off < self.size).then_some(off))
    }
    fn seek_hole(&self, _off: u64) -> Result<u64> {
        Ok(self.size)
    }
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)> {
        seek_status(self, off, len)
    }
}

/// A socket timeout surfaces as EAGAIN ("Resource temporarily unavailable"): say what it is.
fn timed_out(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out (no answer from the server)",
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn uris() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///base?socket=/run/b.sock"),
            Some(NbdUri {
                export: "base".into(),
                socket: "/run/b.sock".into()
            })
        );
        assert_eq!(NbdUri::parse("nbd+unix:///?socket=/s").unwrap().export, "");
        assert!(NbdUri::parse("nbd://host/x").is_none());
    }
}
