//! The cache index of the hoard (`caches/<name>.vmh`), pure encoding and decoding: a hoarded
//! cache's guest chunks mapped to chunks of packs, as runs, with what the cache was (geometry,
//! base, vmicache extension, trace). The layout is in [`super::format`] and docs/format.md.

use super::format::{
    le32, le64, Bad, CHUNK, INDEX_MAGIC, MAX_INDEX_BYTES, MAX_VIRTUAL_SIZE, VERSION,
    ZERO_DATA_PACK, ZERO_PACK,
};

fn bad<T>(what: impl Into<String>) -> Result<T, Bad> {
    Err(Bad(what.into()))
}

/// A run of guest chunks: `count` chunks from guest chunk `start` are chunks `first ..` of
/// pack `pack` (an index into the index's pack list), or zeros ([`ZERO_PACK`],
/// [`ZERO_DATA_PACK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRun {
    pub start: u64,
    pub count: u32,
    pub pack: u32,
    pub first: u32,
}

impl IndexRun {
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.count)
    }
    /// Zero clusters of the cache.
    pub fn is_zero(&self) -> bool {
        self.pack == ZERO_PACK
    }
    /// Chunks stored in a pack (not zeros of either kind).
    pub fn in_pack(&self) -> bool {
        self.pack < ZERO_DATA_PACK
    }
}

pub const RUN_LEN: usize = 20;

/// What a hoarded cache was, and where its chunks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheIndex {
    pub virtual_size: u64,
    pub cluster_bits: u32,
    /// As the cache named it, resolved to an absolute path (or an NBD URI).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The vmicache header extension, as the cache had it.
    pub extension: Vec<u8>,
    /// The cache's trace file, when it had one.
    pub trace: Vec<u8>,
    /// Pack ids (BLAKE3 of the pack file).
    pub packs: Vec<[u8; 32]>,
    pub runs: Vec<IndexRun>,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], Bad> {
        let end = (self.at as u64)
            .checked_add(n)
            .filter(|&e| e <= self.b.len() as u64);
        match end {
            Some(e) => {
                let s = &self.b[self.at..e as usize];
                self.at = e as usize;
                Ok(s)
            }
            None => bad(format!("index cut short in {what}")),
        }
    }
    fn u16(&mut self, what: &str) -> Result<u16, Bad> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Bad> {
        Ok(le32(self.take(4, what)?, 0))
    }
    fn u64(&mut self, what: &str) -> Result<u64, Bad> {
        Ok(le64(self.take(8, what)?, 0))
    }
    fn text(&mut self, n: u64, what: &str) -> Result<Option<String>, Bad> {
        let s = self.take(n, what)?;
        if s.is_empty() {
            return Ok(None);
        }
        match std::str::from_utf8(s) {
            Ok(t) if !t.contains('\0') => Ok(Some(t.to_string())),
            _ => bad(format!("{what} is not UTF-8 text")),
        }
    }
}

impl CacheIndex {
    /// Guest chunks of the virtual size (the last one may be partial).
    pub fn chunks(&self) -> u64 {
        self.virtual_size.div_ceil(CHUNK)
    }

    /// Encode, refusing what no reader would take back (lengths beyond their fields, an index
    /// beyond [`MAX_INDEX_BYTES`], a virtual size out of range).
    pub fn encode(&self) -> Result<Vec<u8>, Bad> {
        if self.virtual_size == 0 || self.virtual_size > MAX_VIRTUAL_SIZE {
            return bad(format!("virtual size {}", self.virtual_size));
        }
        let len16 = |v: &Option<String>, what: &str| -> Result<u16, Bad> {
            u16::try_from(v.as_deref().map_or(0, str::len))
                .map_err(|_| Bad(format!("{what} longer than 64 KiB")))
        };
        let len32 = |v: &[u8], what: &str| -> Result<u32, Bad> {
            u32::try_from(v.len()).map_err(|_| Bad(format!("{what} larger than 4 GiB")))
        };
        let size = 64
            + self.backing_file.as_ref().map_or(0, String::len)
            + self.backing_format.as_ref().map_or(0, String::len)
            + self.extension.len()
            + self.trace.len()
            + 32 * self.packs.len()
            + RUN_LEN * self.runs.len()
            + 32;
        if size as u64 > MAX_INDEX_BYTES {
            return bad(format!("an index of {size} B (at most {MAX_INDEX_BYTES})"));
        }
        let mut b = Vec::with_capacity(size);
        b.extend_from_slice(INDEX_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(CHUNK as u32).to_le_bytes());
        b.extend_from_slice(&self.virtual_size.to_le_bytes());
        b.extend_from_slice(&self.cluster_bits.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (s, what) in [
            (&self.backing_file, "backing file"),
            (&self.backing_format, "backing format"),
        ] {
            b.extend_from_slice(&len16(s, what)?.to_le_bytes());
            b.extend_from_slice(s.as_deref().unwrap_or("").as_bytes());
        }
        for (v, what) in [(&self.extension, "extension"), (&self.trace, "trace")] {
            b.extend_from_slice(&len32(v, what)?.to_le_bytes());
            b.extend_from_slice(v);
        }
        let np = u32::try_from(self.packs.len()).map_err(|_| Bad("too many packs".into()))?;
        b.extend_from_slice(&np.to_le_bytes());
        for p in &self.packs {
            b.extend_from_slice(p);
        }
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for r in &self.runs {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.count.to_le_bytes());
            b.extend_from_slice(&r.pack.to_le_bytes());
            b.extend_from_slice(&r.first.to_le_bytes());
        }
        let h = blake3::hash(&b);
        b.extend_from_slice(h.as_bytes());
        Ok(b)
    }

    /// Decode and check: the hash, the geometry, runs in order within the virtual size and
    /// naming packs of the list. (Whether each run lies within its pack is checked when the
    /// packs are opened.)
    pub fn decode(b: &[u8]) -> Result<CacheIndex, Bad> {
        if b.len() < 8 + 32 || &b[..8] != INDEX_MAGIC {
            return bad("not a hoard cache index (bad magic)");
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return bad("index checksum mismatch (damaged file)");
        }
        let mut r = Reader { b: body, at: 8 };
        let v = r.u32("version")?;
        if v != VERSION {
            return bad(format!("index version {v} (this vmicache reads {VERSION})"));
        }
        let cs = r.u32("chunk size")?;
        if u64::from(cs) != CHUNK {
            return bad(format!("chunk size {cs} (only {CHUNK})"));
        }
        let virtual_size = r.u64("virtual size")?;
        let cluster_bits = r.u32("cluster bits")?;
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return bad(format!("virtual size {virtual_size}"));
        }
        if !(12..=21).contains(&cluster_bits) {
            return bad(format!(
                "cluster bits {cluster_bits} (4 KiB to 2 MiB clusters)"
            ));
        }
        let flags = r.u32("flags")?;
        if flags != 0 {
            return bad(format!("unknown index flags {flags:#x}"));
        }
        let n = r.u16("backing file")?;
        let backing_file = r.text(n.into(), "backing file")?;
        let n = r.u16("backing format")?;
        let backing_format = r.text(n.into(), "backing format")?;
        let n = r.u32("extension")?;
        let extension = r.take(n.into(), "extension")?.to_vec();
        let n = r.u32("trace")?;
        let trace = r.take(n.into(), "trace")?.to_vec();
        let np = r.u32("packs")?;
        let ids = r.take(u64::from(np) * 32, "pack ids")?;
        let packs: Vec<[u8; 32]> = ids
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let nr = r.u64("runs")?;
        let rb = r.take(nr.saturating_mul(RUN_LEN as u64), "runs")?;
        if r.at != body.len() {
            return bad("trailing bytes after the runs");
        }
        let mut idx = CacheIndex {
            virtual_size,
            cluster_bits,
            backing_file,
            backing_format,
            extension,
            trace,
            packs,
            runs: Vec::with_capacity(nr as usize),
        };
        let total = idx.chunks();
        let mut prev = 0u64;
        for (i, e) in rb.chunks_exact(RUN_LEN).enumerate() {
            let run = IndexRun {
                start: le64(e, 0),
                count: le32(e, 8),
                pack: le32(e, 12),
                first: le32(e, 16),
            };
            if run.count == 0
                || run.start < prev
                || run
                    .start
                    .checked_add(run.count.into())
                    .is_none_or(|e| e > total)
            {
                return bad(format!(
                    "run {i} (chunks {}+{}) out of order or beyond the virtual size",
                    run.start, run.count
                ));
            }
            if run.in_pack()
                && (run.pack as usize >= idx.packs.len()
                    || run.first.checked_add(run.count).is_none())
            {
                return bad(format!(
                    "run {i} names pack {} of {}",
                    run.pack,
                    idx.packs.len()
                ));
            }
            prev = run.end();
            idx.runs.push(run);
        }
        // Each pack once, and each named by a run (writers never do otherwise; a hostile
        // list would make readers open one pack many times).
        let mut used = vec![false; idx.packs.len()];
        for r in idx.runs.iter().filter(|r| r.in_pack()) {
            used[r.pack as usize] = true;
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return bad(format!("pack {i} of the list is named by no run"));
        }
        let mut ids = idx.packs.clone();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("a pack is listed twice");
        }
        Ok(idx)
    }

    /// The run holding guest chunk `c`, or the index of the first run after it.
    pub fn find(&self, c: u64) -> Result<usize, usize> {
        let i = self.runs.partition_point(|r| r.end() <= c);
        match self.runs.get(i) {
            Some(r) if r.start <= c => Ok(i),
            _ => Err(i),
        }
    }
}

/// Append a run of `count` chunks from guest chunk `start` (pack `pack`, from chunk `first`)
/// to `runs`, joining it to the last run where it continues it.
pub fn push_run(runs: &mut Vec<IndexRun>, start: u64, count: u32, pack: u32, first: u32) {
    if let Some(l) = runs.last_mut() {
        let continues = l.count < u32::MAX
            && l.end() == start
            && l.pack == pack
            && (pack >= ZERO_DATA_PACK || l.first.checked_add(l.count) == Some(first));
        if continues {
            let n = count.min(u32::MAX - l.count);
            l.count += n;
            if n == count {
                return;
            }
            let first = if pack >= ZERO_DATA_PACK { 0 } else { first + n };
            return push_run(runs, start + u64::from(n), count - n, pack, first);
        }
    }
    runs.push(IndexRun {
        start,
        count,
        pack,
        first: if pack >= ZERO_DATA_PACK { 0 } else { first },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CacheIndex {
        CacheIndex {
            virtual_size: 1 << 30,
            cluster_bits: 16,
            backing_file: Some("/images/base.raw".into()),
            backing_format: Some("raw".into()),
            extension: vec![1, 2, 3],
            trace: vec![],
            packs: vec![[7u8; 32]],
            runs: vec![
                IndexRun {
                    start: 0,
                    count: 16,
                    pack: 0,
                    first: 0,
                },
                IndexRun {
                    start: 16,
                    count: 16,
                    pack: ZERO_PACK,
                    first: 0,
                },
                IndexRun {
                    start: 100,
                    count: 3,
                    pack: 0,
                    first: 16,
                },
            ],
        }
    }

    #[test]
    fn index_round_trip_and_damage() {
        let i = sample();
        let b = i.encode().unwrap();
        assert_eq!(CacheIndex::decode(&b).unwrap(), i);
        assert_eq!(i.find(17), Ok(1));
        assert_eq!(i.find(50), Err(2));
        assert_eq!(i.find(200), Err(3));
        for at in [0, 9, 20, b.len() / 2, b.len() - 1] {
            let mut d = b.clone();
            d[at] ^= 1;
            assert!(CacheIndex::decode(&d).is_err(), "flip at {at}");
        }
        for n in 0..b.len() {
            assert!(CacheIndex::decode(&b[..n]).is_err());
        }
    }

    #[test]
    fn runs_are_checked() {
        let mut i = sample();
        i.runs[1].start = 10; // overlaps run 0
        assert!(CacheIndex::decode(&i.encode().unwrap()).is_err());
        let mut i = sample();
        i.runs[2].pack = 1;
        assert!(CacheIndex::decode(&i.encode().unwrap()).is_err());
        let mut i = sample();
        i.packs.push([7u8; 32]); // listed twice
        i.runs[2].pack = 1;
        assert!(CacheIndex::decode(&i.encode().unwrap()).is_err());
        let mut i = sample();
        i.packs.push([8u8; 32]); // named by no run
        assert!(CacheIndex::decode(&i.encode().unwrap()).is_err());
        let mut i = sample();
        i.virtual_size = 0;
        assert!(i.encode().is_err());
        let mut i = sample();
        i.runs[2].start = (1 << 30) / CHUNK - 1;
        assert!(CacheIndex::decode(&i.encode().unwrap()).is_err());
    }

    #[test]
    fn runs_split_at_the_count_limit() {
        let mut runs = Vec::new();
        let max = u64::from(u32::MAX);
        push_run(&mut runs, 0, u32::MAX, ZERO_DATA_PACK + 1, 0);
        push_run(&mut runs, max, u32::MAX, ZERO_DATA_PACK + 1, 0);
        push_run(&mut runs, 2 * max, 5, ZERO_DATA_PACK + 1, 0);
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[2].start, 2 * max);
        let mut runs = Vec::new();
        push_run(&mut runs, 0, u32::MAX - 2, 0, 0);
        push_run(&mut runs, max - 2, 4, 0, u32::MAX - 2);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].count, runs[1].start, runs[1].count),
            (u32::MAX, max, 2)
        );
        assert_eq!(runs[1].first, u32::MAX);
    }
}
