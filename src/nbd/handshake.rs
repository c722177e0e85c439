//! Option haggling: from the greeting to the choice of an export (or the client leaving).
//! See the module documentation of [`crate::nbd`] for the options understood.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::export::Export;
use super::proto::*;
use super::state::{lock, ExportSlot, Exports, Shared};
use crate::format::{be_u32, be_u64};

/// What the handshake settled.
pub(super) struct Negotiated {
    /// The connection's place in its export's count, held for the transmission phase.
    pub(super) slot: ExportSlot,
    pub(super) export: Arc<dyn Export>,
    pub(super) structured: bool,
    pub(super) base_allocation: bool,
}

pub(super) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(be_u32(&b, 0))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(be_u64(&b, 0))
}

pub(super) fn violation(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The export selected by `name`: an empty name selects the export named `""` if there is
/// one, otherwise the first.
fn lookup(exports: &[(String, Arc<dyn Export>)], name: &str) -> Option<usize> {
    exports
        .iter()
        .position(|(n, _)| n == name)
        .or(if name.is_empty() { Some(0) } else { None })
}

fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn preferred_block_size(export: &dyn Export) -> u32 {
    let p = export.preferred_block_size();
    if p.is_power_of_two() && (512..=MAX_PAYLOAD).contains(&p) {
        p
    } else {
        4096
    }
}

/// Option haggling. `Ok(None)` when the client leaves (or must be dropped) without
/// entering transmission; `Err` on I/O errors and protocol violations.
pub(super) fn handshake(
    r: &mut impl Read,
    writer: &Mutex<UnixStream>,
    exports: &Exports,
    shared: &Arc<Shared>,
) -> io::Result<Option<Negotiated>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    lock(writer).write_all(&greeting)?;

    let client_flags = read_u32(r)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation("unknown client flags"));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let mut h = Haggle {
        writer,
        exports,
        shared,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(violation("bad option magic"));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION_LEN {
            // Skipping gigabytes is not worth it; the protocol allows dropping such clients.
            return Err(violation("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        if !fixed && opt != OPT_EXPORT_NAME {
            // Plain newstyle has no way to refuse an option.
            return Err(violation(
                "option other than EXPORT_NAME without fixed newstyle",
            ));
        }
        let step = if shared.stopping() && opt != OPT_ABORT && opt != OPT_EXPORT_NAME {
            h.reply(opt, REP_ERR_SHUTDOWN, b"server is shutting down")
                .map(|()| Step::Next)
        } else {
            match opt {
                OPT_EXPORT_NAME => h.export_name(&data),
                OPT_ABORT => {
                    // The client may already be gone; that is fine.
                    let _ = h.reply(opt, REP_ACK, &[]);
                    Ok(Step::Leave)
                }
                OPT_LIST => h.list(&data),
                OPT_STRUCTURED_REPLY => h.structured_reply(&data),
                OPT_INFO | OPT_GO => h.info_go(opt, &data),
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => h.meta_context(opt, &data),
                _ => {
                    // STARTTLS, EXTENDED_HEADERS and anything newer.
                    let msg = format!("option {opt} is not supported");
                    h.reply(opt, REP_ERR_UNSUP, msg.as_bytes())
                        .map(|()| Step::Next)
                }
            }
        };
        match step? {
            Step::Next => {}
            Step::Leave => return Ok(None),
            Step::Go(n) => return Ok(Some(n)),
        }
    }
}

/// What to do after an option.
enum Step {
    /// Read the next option.
    Next,
    /// End the connection.
    Leave,
    /// Enter transmission.
    Go(Negotiated),
}

/// The state of option haggling on one connection.
struct Haggle<'a> {
    writer: &'a Mutex<UnixStream>,
    exports: &'a Exports,
    shared: &'a Arc<Shared>,
    no_zeroes: bool,
    structured: bool,
    /// Export index and selection of the last SET_META_CONTEXT.
    meta: Option<(usize, bool)>,
}

impl Haggle<'_> {
    fn reply(&self, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
        lock(self.writer).write_all(&option_reply(opt, typ, data))
    }

    /// The transmission phase on export `idx`, or `None` when the export is at its
    /// connection limit.
    fn negotiated(&self, idx: usize) -> Option<Negotiated> {
        Some(Negotiated {
            slot: self.shared.export_slot(idx)?,
            export: self.exports[idx].1.clone(),
            structured: self.structured,
            base_allocation: self.meta == Some((idx, true)),
        })
    }

    /// `NBD_OPT_EXPORT_NAME`: no way to refuse but closing.
    fn export_name(&self, data: &[u8]) -> io::Result<Step> {
        let Some(idx) = std::str::from_utf8(data)
            .ok()
            .and_then(|name| lookup(self.exports, name))
        else {
            return Ok(Step::Leave);
        };
        if self.shared.stopping() {
            return Ok(Step::Leave);
        }
        let Some(neg) = self.negotiated(idx) else {
            return Ok(Step::Leave);
        };
        let export = &*neg.export;
        let mut b = Vec::with_capacity(134);
        b.extend_from_slice(&export.size().to_be_bytes());
        b.extend_from_slice(&transmission_flags(export, self.structured).to_be_bytes());
        if !self.no_zeroes {
            b.extend_from_slice(&[0u8; 124]);
        }
        lock(self.writer).write_all(&b)?;
        Ok(Step::Go(neg))
    }

    fn list(&self, data: &[u8]) -> io::Result<Step> {
        let opt = OPT_LIST;
        if !data.is_empty() {
            self.reply(opt, REP_ERR_INVALID, b"LIST takes no data")?;
            return Ok(Step::Next);
        }
        for (name, _) in self.exports.iter() {
            let mut d = Vec::with_capacity(4 + name.len());
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            self.reply(opt, REP_SERVER, &d)?;
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok(Step::Next)
    }

    fn structured_reply(&mut self, data: &[u8]) -> io::Result<Step> {
        let opt = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            self.reply(opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
            return Ok(Step::Next);
        }
        self.structured = true;
        self.reply(opt, REP_ACK, &[])?;
        Ok(Step::Next)
    }

    fn info_go(&self, opt: u32, data: &[u8]) -> io::Result<Step> {
        let mut d = OptionData::new(data);
        let parsed = (|| {
            let name = d.string()?;
            let n = d.u16()?;
            let requests = (0..n).map(|_| d.u16()).collect::<Option<Vec<u16>>>()?;
            d.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
            return Ok(Step::Next);
        };
        let Some(idx) = lookup(self.exports, name) else {
            let msg = format!("no export named {name:?}");
            self.reply(opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(Step::Next);
        };
        let (canonical, export) = &self.exports[idx];
        let neg = if opt == OPT_GO {
            let Some(neg) = self.negotiated(idx) else {
                let msg = format!(
                    "export {canonical:?} has its maximum of {} connections",
                    self.shared.limits.max_connections_per_export
                );
                self.reply(opt, REP_ERR_POLICY, msg.as_bytes())?;
                return Ok(Step::Next);
            };
            Some(neg)
        } else {
            None
        };
        let reply = |opt: u32, typ: u32, data: &[u8]| self.reply(opt, typ, data);
        send_info(
            &reply,
            opt,
            canonical,
            &**export,
            self.structured,
            &requests,
        )?;
        self.reply(opt, REP_ACK, &[])?;
        Ok(neg.map_or(Step::Next, Step::Go))
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<Step> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            self.meta = None;
        }
        if !self.structured {
            self.reply(opt, REP_ERR_INVALID, b"structured replies not negotiated")?;
            return Ok(Step::Next);
        }
        let mut d = OptionData::new(data);
        let parsed = (|| {
            let name = d.string()?;
            let n = d.u32()?;
            // Each query takes at least 4 bytes: bound n before collecting.
            if n as usize > data.len() / 4 {
                return None;
            }
            let queries = (0..n).map(|_| d.string()).collect::<Option<Vec<&str>>>()?;
            d.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.reply(opt, REP_ERR_INVALID, b"malformed meta context request")?;
            return Ok(Step::Next);
        };
        let Some(idx) = lookup(self.exports, name) else {
            let msg = format!("no export named {name:?}");
            self.reply(opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(Step::Next);
        };
        let selected = if set {
            queries.contains(&CONTEXT_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == CONTEXT_BASE_ALLOCATION || *q == "base:")
        };
        if selected {
            let id = if set { CONTEXT_ID_BASE_ALLOCATION } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &d)?;
        }
        if set {
            self.meta = Some((idx, selected));
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok(Step::Next)
    }
}

/// The `NBD_REP_INFO` replies of `INFO`/`GO`: export size and flags, block sizes, and the
/// name and description when requested.
fn send_info(
    reply: &impl Fn(u32, u32, &[u8]) -> io::Result<()>,
    opt: u32,
    name: &str,
    export: &dyn Export,
    structured: bool,
    requests: &[u16],
) -> io::Result<()> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.size().to_be_bytes());
    d.extend_from_slice(&transmission_flags(export, structured).to_be_bytes());
    reply(opt, REP_INFO, &d)?;

    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&preferred_block_size(export).to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    reply(opt, REP_INFO, &d)?;

    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        reply(opt, REP_INFO, &d)?;
    }
    if requests.contains(&INFO_DESCRIPTION) {
        if let Some(desc) = export.description() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(truncate_utf8(&desc, MAX_STRING).as_bytes());
            reply(opt, REP_INFO, &d)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_export() {
        let e: Arc<dyn Export> = Arc::new(super::super::export::MemExport::new(512));
        let list = vec![("a".to_string(), e.clone()), ("".to_string(), e.clone())];
        assert_eq!(lookup(&list, ""), Some(1));
        assert_eq!(lookup(&list, "a"), Some(0));
        assert_eq!(lookup(&list[..1], ""), Some(0));
        assert_eq!(lookup(&list, "b"), None);
    }
}
