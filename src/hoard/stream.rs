//! `hoard send` / `hoard receive`: what a node at one generation lacks to reach the newest,
//! as one stream over any pipe (zfs send/recv's role), and the installing of received
//! generations that `hoard pull` shares.
//!
//! ```text
//! header   "VMIHSTRM" u32 version (1) u32 0, from id [32] (zeros: a full stream),
//!          from number u64, to id [32], to number u64          (all little-endian)
//! items    kind u8, id [32], length u64, bytes  — the target generation's record (1), the
//!          indexes the receiver lacks (2), then the packs (3)
//! end      kind 0, BLAKE3 of the header and every item's kind, id and length [32], 0 u64
//! ```
//!
//! Each item is checked against its id (BLAKE3 of its bytes) as it arrives; packs the target
//! generation does not use are refused before they are written. Packs and indexes are
//! written and synced under temporary names and renamed into place; `HEAD` moves last, so a
//! kill at any point leaves the previous generation in force.

use super::format::hex;
use super::gens::{GenId, Generation};
use super::index::CacheIndex;
use super::store::{sync_dir, Hoard, WriteLock};
use crate::{Error, Result, Subject};
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};

const MAGIC: &[u8; 8] = b"VMIHSTRM";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 32 + 8 + 32 + 8;
const KIND_END: u8 = 0;
const KIND_GEN: u8 = 1;
const KIND_INDEX: u8 = 2;
const KIND_PACK: u8 = 3;
/// Largest pack accepted (a pack holds at most 2^18 chunks of 4 KiB, stored or compressed).
pub const MAX_PACK_BYTES: u64 = (1 << 31) + (64 << 20);

fn stream() -> Subject {
    Subject::Other("hoard stream".into())
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StreamReport {
    /// The generation reached (or sent).
    pub generation: u64,
    pub id: String,
    /// The generation the stream starts from (None: a full stream).
    pub from: Option<u64>,
    pub indexes: usize,
    pub packs: usize,
    pub pack_bytes: u64,
    /// Packs the receiver had already (not written again).
    pub packs_present: usize,
    /// Bytes of the whole stream.
    pub bytes: u64,
    /// The receiver was at the target generation already.
    pub up_to_date: bool,
    pub seconds: f64,
}

/// What a generation names that another does not.
#[derive(Debug, Default)]
pub struct Needs {
    pub indexes: Vec<[u8; 32]>,
    pub packs: Vec<[u8; 32]>,
}

/// What generation `to` needs beyond generation `from` (all of it when None).
pub fn needs(h: &Hoard, to: &Generation, from: Option<&Generation>) -> Result<Needs> {
    let (mut have_i, mut have_p) = (HashSet::new(), HashSet::new());
    if let Some(f) = from {
        for id in f.indexes()?.into_values() {
            if have_i.insert(id) {
                have_p.extend(h.stored_index(&id)?.packs);
            }
        }
    }
    let (mut idx, mut packs, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    for id in to.indexes()?.into_values() {
        if have_i.contains(&id) || idx.contains(&id) {
            continue;
        }
        idx.push(id);
        for p in h.stored_index(&id)?.packs {
            if !have_p.contains(&p) && seen.insert(p) {
                packs.push(p);
            }
        }
    }
    Ok(Needs {
        indexes: idx,
        packs,
    })
}

/// A writer that hashes what the stream's end checksum covers and counts bytes.
struct Out<'a> {
    w: &'a mut dyn Write,
    sum: blake3::Hasher,
    bytes: u64,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8], summed: bool) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| Error::io(stream(), "write", e))?;
        if summed {
            self.sum.update(b);
        }
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn item(&mut self, kind: u8, id: &[u8; 32], len: u64) -> Result<()> {
        let mut b = vec![kind];
        b.extend_from_slice(id);
        b.extend_from_slice(&len.to_le_bytes());
        self.put(&b, true)
    }
}

/// Write to `w` what a node at generation `from` (a number; None: any node) lacks to reach
/// this hoard's newest generation.
pub fn send(h: &Hoard, from: Option<u64>, w: &mut dyn Write) -> Result<StreamReport> {
    let t0 = std::time::Instant::now();
    let _lock = h.read_lock()?;
    let (to_id, to) = h
        .head()?
        .ok_or_else(|| Error::refused(h.dir(), "no generation to send (nothing hoarded yet)"))?;
    let base: Option<(GenId, Generation)> = match from {
        None => None,
        Some(n) => Some(
            h.history()?
                .into_iter()
                .find(|(_, g)| g.generation == n)
                .ok_or_else(|| {
                    Error::refused(
                        h.dir(),
                        format!(
                            "generation {n} is not kept here (older than the GC window, or never made): send a full stream (no --from)"
                        ),
                    )
                })?,
        ),
    };
    let Needs {
        indexes: idx,
        packs,
    } = needs(h, &to, base.as_ref().map(|(_, g)| g))?;
    let mut o = Out {
        w,
        sum: blake3::Hasher::new(),
        bytes: 0,
    };
    let mut head = Vec::with_capacity(HEADER);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&base.as_ref().map_or([0; 32], |(id, _)| *id));
    head.extend_from_slice(&base.as_ref().map_or(0, |(_, g)| g.generation).to_le_bytes());
    head.extend_from_slice(&to_id);
    head.extend_from_slice(&to.generation.to_le_bytes());
    o.put(&head, true)?;
    let rec = h.gen_bytes(&to_id)?;
    o.item(KIND_GEN, &to_id, rec.len() as u64)?;
    o.put(&rec, false)?;
    for id in &idx {
        let b = h.index_bytes(id)?;
        o.item(KIND_INDEX, id, b.len() as u64)?;
        o.put(&b, false)?;
    }
    let mut rep = StreamReport {
        generation: to.generation,
        id: hex(&to_id),
        from,
        indexes: idx.len(),
        ..Default::default()
    };
    let mut buf = vec![0u8; 1 << 20];
    for id in &packs {
        let p = h.pack_path(id);
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, "open", e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, "stat", e))?.len();
        o.item(KIND_PACK, id, len)?;
        let mut left = len;
        let mut sum = blake3::Hasher::new();
        while left > 0 {
            let n = buf.len().min(left as usize);
            f.read_exact(&mut buf[..n])
                .map_err(|e| Error::io(&p, "read", e))?;
            sum.update(&buf[..n]);
            o.put(&buf[..n], false)?;
            left -= n as u64;
        }
        // A pack damaged on disk is not passed on (the receiver would refuse it anyway).
        if sum.finalize().as_bytes() != id {
            return Err(Error::corrupt(
                &p,
                "content does not match its name (`hoard verify`)",
            ));
        }
        rep.packs += 1;
        rep.pack_bytes += len;
    }
    let sum = *o.sum.finalize().as_bytes();
    let mut end = vec![KIND_END];
    end.extend_from_slice(&sum);
    end.extend_from_slice(&0u64.to_le_bytes());
    o.put(&end, false)?;
    o.w.flush().map_err(|e| Error::io(stream(), "write", e))?;
    rep.bytes = o.bytes;
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

/// A reader that hashes what the end checksum covers and counts bytes.
struct In<'a> {
    r: &'a mut dyn Read,
    sum: blake3::Hasher,
    bytes: u64,
}

impl In<'_> {
    fn get(&mut self, b: &mut [u8], summed: bool) -> Result<()> {
        self.r.read_exact(b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::refused(stream(), "cut short (nothing applied)")
            } else {
                Error::io(stream(), "read", e)
            }
        })?;
        if summed {
            self.sum.update(b);
        }
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn item(&mut self) -> Result<(u8, [u8; 32], u64)> {
        let mut b = [0u8; 41];
        self.get(&mut b[..1], false)?;
        if b[0] == KIND_END {
            self.get(&mut b[1..], false)?;
        } else {
            let (kind, rest) = b.split_at_mut(1);
            self.sum.update(kind);
            self.get(rest, true)?;
        }
        Ok((
            b[0],
            b[1..33].try_into().unwrap(),
            u64::from_le_bytes(b[33..].try_into().unwrap()),
        ))
    }

    fn bytes(&mut self, len: u64, max: u64, what: &str) -> Result<Vec<u8>> {
        if len > max {
            return Err(Error::refused(
                stream(),
                format!("{what} of {len} B is too large"),
            ));
        }
        // Grown as bytes arrive: a length announced is not an allocation made.
        let mut b = Vec::new();
        (&mut *self.r)
            .take(len)
            .read_to_end(&mut b)
            .map_err(|e| Error::io(stream(), "read", e))?;
        if (b.len() as u64) < len {
            return Err(Error::refused(stream(), "cut short (nothing applied)"));
        }
        self.bytes += len;
        Ok(b)
    }
}

/// A pack arriving: written under a temporary name while hashed; [`PackSink::finish`]
/// checks it against its id and its tables, syncs it and renames it into place. Dropped
/// unfinished, the temporary file goes.
pub struct PackSink {
    id: [u8; 32],
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    f: Option<std::fs::File>,
    sum: blake3::Hasher,
    left: u64,
}

impl PackSink {
    pub fn new(h: &Hoard, id: &[u8; 32], len: u64) -> Result<PackSink> {
        if len > MAX_PACK_BYTES {
            return Err(Error::refused(
                stream(),
                format!("a pack of {len} B is too large"),
            ));
        }
        let path = h.pack_path(id);
        let tmp = path.with_file_name(format!(".tmp-{}-{}.pack", std::process::id(), hex(id)));
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        Ok(PackSink {
            id: *id,
            tmp,
            path,
            f: Some(f),
            sum: blake3::Hasher::new(),
            left: len,
        })
    }

    pub fn write(&mut self, b: &[u8]) -> Result<()> {
        if b.len() as u64 > self.left {
            return Err(Error::refused(
                stream(),
                format!("pack {} is longer than announced", hex(&self.id)),
            ));
        }
        self.sum.update(b);
        let f = self.f.as_mut().expect("an open pack");
        f.write_all(b)
            .map_err(|e| Error::io(&self.tmp, "write", e))?;
        self.left -= b.len() as u64;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if self.left != 0 {
            return Err(Error::refused(
                stream(),
                format!("pack {} is shorter than announced", hex(&self.id)),
            ));
        }
        if self.sum.finalize().as_bytes() != &self.id {
            return Err(Error::refused(
                stream(),
                format!("pack {} does not match its name (BLAKE3)", hex(&self.id)),
            ));
        }
        let f = self.f.take().expect("an open pack");
        f.sync_all().map_err(|e| Error::io(&self.tmp, "sync", e))?;
        drop(f);
        super::store::PackReader::open(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io(&self.path, "rename into place", e))
    }
}

impl Drop for PackSink {
    fn drop(&mut self) {
        if self.f.is_some() || self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Pass `len` bytes of the stream into `sink` (or over them, when there is none).
fn copy(r: &mut In, len: u64, mut sink: Option<&mut PackSink>) -> Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        r.get(&mut buf[..n], false)?;
        if let Some(s) = sink.as_deref_mut() {
            s.write(&buf[..n])?;
        }
        left -= n as u64;
    }
    Ok(())
}

/// Check a received index's bytes and store it: its id, and the packs it names.
pub fn install_index(h: &Hoard, id: &[u8; 32], b: &[u8]) -> Result<Vec<[u8; 32]>> {
    if blake3::hash(b).as_bytes() != id {
        return Err(Error::refused(
            stream(),
            format!("index {} does not match its name (BLAKE3)", hex(id)),
        ));
    }
    let i = CacheIndex::decode(b).map_err(|super::format::Bad(w)| {
        Error::refused(stream(), format!("index {}: {w}", hex(id)))
    })?;
    h.put_index_bytes(b)?;
    Ok(i.packs)
}

/// Make generation `to` (record bytes `rec`, its indexes and packs all stored) the newest,
/// after checking that every index and pack it names is here.
pub fn adopt(h: &Hoard, lock: &WriteLock, to: &GenId, rec: &[u8]) -> Result<Generation> {
    let g = Generation::decode(rec, to, stream())?;
    for (name, id) in g.indexes()? {
        let i = h.stored_index(&id).map_err(|e| {
            Error::refused(
                stream(),
                format!("cache '{name}' of the new generation: {e}"),
            )
        })?;
        if let Some(p) = h.missing_pack(&i) {
            return Err(Error::refused(
                stream(),
                format!(
                    "cache '{name}' names pack {}, which is neither here nor in the stream",
                    hex(&p)
                ),
            ));
        }
    }
    sync_dir(&h.dir().join("packs"))?;
    sync_dir(&h.dir().join("indexes"))?;
    // A record from the future would hold every generation in the GC window for ever.
    if g.time > super::gens::now() + 86_400 {
        return Err(Error::refused(
            stream(),
            format!(
                "generation {} is dated {} s in the future (clocks apart?)",
                g.generation,
                g.time - super::gens::now()
            ),
        ));
    }
    h.put_gen_bytes(rec)?;
    h.set_head(lock, to)?;
    log::info!(
        "{}: now at generation {} ({} caches)",
        h.dir().display(),
        g.generation,
        g.caches.len()
    );
    Ok(g)
}

/// Refuse to take this hoard (at generation `here`) back to an older generation `to` unless
/// `force`d; `whose` names where `to` comes from ("the stream's", "latest's").
pub fn not_back(h: &Hoard, here: u64, to: u64, whose: &str, force: bool) -> Result<()> {
    if here > to && !force {
        return Err(Error::refused(
            h.dir(),
            format!(
                "this hoard is at generation {here}, newer than {whose} {to} (--force to go back)"
            ),
        ));
    }
    Ok(())
}

/// The refusal of a stream or pull for a node at another generation.
pub fn not_at(h: &Hoard, here: Option<(u64, &GenId)>, from: u64, from_id: &GenId) -> Error {
    let here = match here {
        None => "has no generation yet".to_string(),
        Some((n, id)) => format!("is at generation {n} ({})", &hex(id)[..16]),
    };
    Error::refused(
        h.dir(),
        format!(
            "this hoard {here}; the stream is from generation {from} ({}): ask for one `--from` this hoard's generation, or a full stream",
            &hex(from_id)[..16]
        ),
    )
}

/// Apply a stream from `r`. `force`: accept a full stream to an older generation than this
/// hoard's.
pub fn receive(h: &Hoard, r: &mut dyn Read, force: bool) -> Result<StreamReport> {
    let t0 = std::time::Instant::now();
    let lock = h.lock()?;
    let mut inp = In {
        r,
        sum: blake3::Hasher::new(),
        bytes: 0,
    };
    let mut head = [0u8; HEADER];
    inp.get(&mut head, true)?;
    if &head[..8] != MAGIC {
        return Err(Error::refused(stream(), "not a vmicache hoard stream"));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(Error::unsupported(
            stream(),
            format!("hoard stream version {version} (this vmicache reads {VERSION})"),
        ));
    }
    let from_id: GenId = head[16..48].try_into().unwrap();
    let from_n = u64::from_le_bytes(head[48..56].try_into().unwrap());
    let to_id: GenId = head[56..88].try_into().unwrap();
    let to_n = u64::from_le_bytes(head[88..96].try_into().unwrap());
    let here = h.head()?;
    let full = from_id == [0; 32];
    let mut rep = StreamReport {
        generation: to_n,
        id: hex(&to_id),
        from: (!full).then_some(from_n),
        ..Default::default()
    };
    if !full && here.as_ref().map(|(id, _)| *id) != Some(from_id) {
        return Err(not_at(
            h,
            here.as_ref().map(|(id, g)| (g.generation, id)),
            from_n,
            &from_id,
        ));
    }
    if let Some((id, g)) = &here {
        if *id == to_id {
            rep.up_to_date = true;
        } else if full {
            not_back(h, g.generation, to_n, "the stream's", force)?;
        }
    }
    // The target generation's record comes first: what it names bounds what is accepted.
    let (kind, id, len) = inp.item()?;
    if kind != KIND_GEN || id != to_id {
        return Err(Error::refused(
            stream(),
            "does not start with its generation's record",
        ));
    }
    let rec = inp.bytes(len, super::gens::MAX_GEN_BYTES, "a generation record")?;
    let g = Generation::decode(&rec, &to_id, stream())?;
    if g.generation != to_n {
        return Err(Error::refused(
            stream(),
            "header and record disagree on the generation",
        ));
    }
    let want_idx: BTreeMap<[u8; 32], String> =
        g.indexes()?.into_iter().map(|(n, id)| (id, n)).collect();
    let mut want_packs: HashSet<[u8; 32]> = HashSet::new();
    for id in want_idx.keys() {
        if let Ok(i) = h.stored_index(id) {
            want_packs.extend(i.packs);
        }
    }
    loop {
        let (kind, id, len) = inp.item()?;
        match kind {
            KIND_END => {
                let sum = *inp.sum.finalize().as_bytes();
                if sum != id {
                    return Err(Error::refused(
                        stream(),
                        "end checksum mismatch (nothing applied)",
                    ));
                }
                break;
            }
            KIND_INDEX => {
                if !want_idx.contains_key(&id) {
                    return Err(Error::refused(
                        stream(),
                        format!(
                            "carries index {}, which its generation does not name",
                            hex(&id)
                        ),
                    ));
                }
                let b = inp.bytes(len, super::format::MAX_INDEX_BYTES, "an index")?;
                want_packs.extend(install_index(h, &id, &b)?);
                rep.indexes += 1;
            }
            KIND_PACK => {
                if !want_packs.contains(&id) {
                    return Err(Error::refused(
                        stream(),
                        format!(
                            "carries pack {}, which its generation does not use",
                            hex(&id)
                        ),
                    ));
                }
                if h.pack_path(&id).exists() {
                    copy(&mut inp, len, None)?;
                    rep.packs_present += 1;
                } else {
                    let mut sink = PackSink::new(h, &id, len)?;
                    copy(&mut inp, len, Some(&mut sink))?;
                    sink.finish()?;
                    rep.packs += 1;
                    rep.pack_bytes += len;
                }
            }
            k => return Err(Error::refused(stream(), format!("unknown item kind {k}"))),
        }
    }
    rep.bytes = inp.bytes;
    if !rep.up_to_date {
        adopt(h, &lock, &to_id, &rec)?;
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}
