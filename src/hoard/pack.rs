//! Pack files on disk: reading frames (each checked against its hash on decode) and writing
//! new packs (synced, then named by the BLAKE3 of their bytes).

use super::format::{self as hf, Bad, Codec, Footer, Frame, Key};
use super::store::{io, sync_dir, Hoard};
use crate::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A pack opened for reading: its frames table (checked), the file kept open.
#[derive(Debug)]
pub struct PackReader {
    pub path: PathBuf,
    file: File,
    pub footer: Footer,
    pub frames: Vec<Frame>,
    /// First chunk of each frame.
    pub first: Vec<u32>,
}

impl PackReader {
    pub fn open(path: &Path) -> Result<PackReader> {
        let file = File::open(path).map_err(io(path, "open"))?;
        let len = file.metadata().map_err(io(path, "stat"))?.len();
        let bad = |Bad(w)| Error::corrupt(path, w);
        if len < hf::PACK_HEADER + hf::PACK_FOOTER {
            return Err(Error::corrupt(
                path,
                format!("pack of {len} B is cut short"),
            ));
        }
        let mut h = [0u8; hf::PACK_HEADER as usize];
        file.read_exact_at(&mut h, 0).map_err(io(path, "read"))?;
        hf::check_pack_header(&h).map_err(bad)?;
        let mut f = [0u8; hf::PACK_FOOTER as usize];
        file.read_exact_at(&mut f, len - hf::PACK_FOOTER)
            .map_err(io(path, "read"))?;
        let footer = Footer::decode(&f, len).map_err(bad)?;
        let mut t = vec![0u8; (u64::from(footer.frames) * hf::FRAME_ENTRY) as usize];
        file.read_exact_at(&mut t, footer.table_offset)
            .map_err(io(path, "read"))?;
        if blake3::hash(&t).as_bytes() != &footer.table_hash {
            return Err(Error::corrupt(path, "frames table checksum mismatch"));
        }
        let (frames, first) = hf::decode_frames(&t, &footer).map_err(bad)?;
        Ok(PackReader {
            path: path.to_path_buf(),
            file,
            footer,
            frames,
            first,
        })
    }

    pub fn chunks(&self) -> u32 {
        self.footer.chunks
    }

    /// The chunk keys, in chunk order (checked against the footer).
    pub fn keys(&self) -> Result<Vec<Key>> {
        let n = self.footer.chunks as usize;
        let mut b = vec![0u8; n * hf::KEY_LEN];
        self.file
            .read_exact_at(&mut b, self.footer.keys_offset())
            .map_err(io(&self.path, "read"))?;
        if blake3::hash(&b).as_bytes() != &self.footer.keys_hash {
            return Err(Error::corrupt(&self.path, "chunk keys checksum mismatch"));
        }
        Ok(b.chunks_exact(hf::KEY_LEN)
            .map(|k| k.try_into().unwrap())
            .collect())
    }

    /// The frame holding chunk `c` (< chunks()).
    pub fn frame_of(&self, c: u32) -> usize {
        self.first.partition_point(|&f| f <= c) - 1
    }

    /// Frame `i`'s chunks, decompressed and checked against its hash: a damaged frame is an
    /// error (logged), never data.
    pub fn read_frame(&self, i: usize) -> Result<Vec<u8>> {
        self.read_frame_into(i, Vec::new())
    }

    /// [`PackReader::read_frame`] into `buf` (a spare buffer whose memory is reused: a fresh
    /// one costs a page fault per page).
    pub fn read_frame_into(&self, i: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        let f = &self.frames[i];
        let raw = u64::from(f.chunks) * hf::CHUNK;
        let data = match f.codec {
            Codec::Plain => {
                let mut stored = buf;
                stored.clear();
                stored.resize(f.len as usize, 0);
                self.file
                    .read_exact_at(&mut stored, f.offset)
                    .map_err(io(&self.path, "read"))?;
                stored
            }
            Codec::Zstd => match self.decode(f, raw as usize, buf)? {
                Ok(d) if d.len() as u64 == raw => d,
                Ok(d) => {
                    return Err(self.damaged(i, format!("decompresses to {} B, not {raw}", d.len())))
                }
                Err(e) => return Err(self.damaged(i, format!("does not decompress: {e}"))),
            },
        };
        if blake3::hash(&data).as_bytes() != &f.hash {
            return Err(self.damaged(i, "checksum mismatch".into()));
        }
        Ok(data)
    }

    /// Frame `f`'s stored bytes read and decompressed into `buf` (at most `raw` bytes).
    fn decode(&self, f: &Frame, raw: usize, buf: Vec<u8>) -> Result<std::io::Result<Vec<u8>>> {
        decompress(
            |stored| {
                let n = f.len as usize;
                stored.reserve_exact(n.saturating_sub(stored.len()));
                stored.resize(n, 0);
                self.file
                    .read_exact_at(stored, f.offset)
                    .map_err(io(&self.path, "read"))
            },
            raw,
            buf,
        )
    }

    fn damaged(&self, i: usize, what: String) -> Error {
        let f = &self.frames[i];
        let what = format!(
            "frame {i} (at {:#x}, {} B, chunks {}..{}) {what}",
            f.offset,
            f.len,
            self.first[i],
            self.first[i] + u32::from(f.chunks)
        );
        log::error!(
            "{}: damaged hoard pack: {what}; the read fails",
            self.path.display()
        );
        Error::corrupt(&self.path, what)
    }
}

/// Decompress a frame of at most `cap` bytes with this thread's decompression context, into
/// `out` (its contents replaced; not zeroed first). The compressed bytes are read into this
/// thread's buffer, kept between frames (at most a frame's largest stored size, about 1 MiB:
/// the frames table is checked when the pack is opened).
fn decompress(
    read: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    cap: usize,
    mut out: Vec<u8>,
) -> Result<std::io::Result<Vec<u8>>> {
    use std::cell::RefCell;
    thread_local! {
        static DCTX: RefCell<(Option<zstd::bulk::Decompressor<'static>>, Vec<u8>)> = const { RefCell::new((None, Vec::new())) };
    }
    DCTX.with(|d| {
        let (ctx, stored) = &mut *d.borrow_mut();
        read(stored)?;
        if ctx.is_none() {
            match zstd::bulk::Decompressor::new() {
                Ok(c) => *ctx = Some(c),
                Err(e) => return Ok(Err(e)),
            }
        }
        out.clear();
        out.reserve_exact(cap);
        let r = ctx
            .as_mut()
            .unwrap()
            .decompress_to_buffer(&stored[..], &mut out)
            .map(|_| out);
        Ok(r)
    })
}

/// Compress a frame's chunks: zstd at `level`, or as they are when that saves nothing.
/// Each thread keeps one compression context per level (creating one per frame cost ~4% of
/// an add).
pub fn encode_frame(raw: &[u8], level: i32) -> (Vec<u8>, Codec, [u8; 32]) {
    use std::cell::RefCell;
    thread_local! {
        static CCTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    }
    let hash = *blake3::hash(raw).as_bytes();
    let c = CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        c.as_mut().and_then(|(_, z)| z.compress(raw).ok())
    });
    match c {
        Some(c) if c.len() < raw.len() => (c, Codec::Zstd, hash),
        _ => (raw.to_vec(), Codec::Plain, hash),
    }
}

/// A pack being written: a temporary file in `packs/`, renamed to its id when finished.
pub struct PackWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    hasher: blake3::Hasher,
    at: u64,
    frames: Vec<Frame>,
    keys: Vec<u8>,
    chunks: u32,
    renamed: bool,
}

impl PackWriter {
    pub fn create(hoard: &Hoard) -> Result<PackWriter> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = hoard.dir().join("packs");
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}.pack", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        let h = hf::pack_header();
        file.write_all(&h).map_err(io(&tmp, "write"))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h);
        Ok(PackWriter {
            dir,
            tmp,
            file: Some(file),
            hasher,
            at: hf::PACK_HEADER,
            frames: Vec::new(),
            keys: Vec::new(),
            chunks: 0,
            renamed: false,
        })
    }

    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.at
    }

    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// Append a frame (as [`encode_frame`] made it) of `keys.len()` chunks.
    pub fn push(
        &mut self,
        stored: &[u8],
        codec: Codec,
        hash: [u8; 32],
        keys: &[Key],
    ) -> Result<()> {
        let f = self.file.as_mut().expect("pack writer open");
        f.write_all(stored).map_err(io(&self.tmp, "write"))?;
        self.hasher.update(stored);
        self.frames.push(Frame {
            offset: self.at,
            len: stored.len() as u32,
            chunks: keys.len() as u16,
            codec,
            hash,
        });
        self.at += stored.len() as u64;
        for k in keys {
            self.keys.extend_from_slice(k);
        }
        self.chunks += keys.len() as u32;
        Ok(())
    }

    /// Write the tables, sync, and rename the pack to its id (None, and nothing left, when no
    /// chunk was written).
    pub fn finish(mut self) -> Result<Option<[u8; 32]>> {
        if self.chunks == 0 {
            return Ok(None);
        }
        let mut t = Vec::with_capacity(self.frames.len() * hf::FRAME_ENTRY as usize);
        for f in &self.frames {
            f.encode(&mut t);
        }
        let footer = Footer {
            frames: self.frames.len() as u32,
            chunks: self.chunks,
            table_offset: self.at,
            table_hash: *blake3::hash(&t).as_bytes(),
            keys_hash: *blake3::hash(&self.keys).as_bytes(),
        };
        let mut f = self.file.take().expect("pack writer open");
        let end = footer.encode();
        for part in [&t[..], &self.keys[..], &end[..]] {
            f.write_all(part).map_err(io(&self.tmp, "write"))?;
            self.hasher.update(part);
        }
        f.sync_all().map_err(io(&self.tmp, "sync"))?;
        let id = *self.hasher.finalize().as_bytes();
        let path = self.dir.join(format!("{}.pack", hf::hex(&id)));
        std::fs::rename(&self.tmp, &path).map_err(io(&path, "rename into place"))?;
        self.renamed = true;
        sync_dir(&self.dir)?;
        Ok(Some(id))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // Unfinished (an error, or nothing written): leave nothing behind.
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
