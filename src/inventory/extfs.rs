//! What ext4-view does not say: the inode number behind each directory entry and the blocks
//! each file's data lies in. A small reader of ext2/3/4 metadata (superblock, group
//! descriptors, inodes, extent trees, indirect blocks, directory blocks), every number checked
//! and every walk bounded; layouts in docs/inventory.md.

use super::disk::Disk;
use std::collections::HashMap;
use std::rc::Rc;

/// A run of a file's blocks: file block `logical` and on, at fs block `phys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext {
    pub logical: u64,
    pub phys: u64,
    pub count: u64,
}

/// A piece of a file's data: (byte in the file, disk start, disk end).
pub type Piece = (u64, u64, u64);

/// The inode fields this reader uses.
pub struct RawInode {
    pub mode: u16,
    pub flags: u32,
    pub size: u64,
    i_block: [u8; 60],
    /// 512-byte sectors allocated (`i_blocks_lo`), and the extended-attribute block.
    sectors: u32,
    xattr_block: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch (signed 32 bits; the extra epoch bits of large inodes are
    /// not read).
    pub mtime: i64,
}

impl RawInode {
    pub fn is_dir(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }
}

const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const FLAG_EXTENTS: u32 = 0x80000;
const FLAG_INLINE: u32 = 0x1000_0000;
/// Extents of one file, beyond which it is refused as hostile.
const MAX_EXTENTS: usize = 1 << 20;
const CACHE_BLOCKS: usize = 4096;
/// A directory larger than this is read this far: real ones are far smaller, and a listing
/// must end.
pub const MAX_DIR_BYTES: u64 = 16 << 20;
/// More block groups than this (128 TiB at 4 KiB blocks) are refused: ext4-view keeps every
/// group's descriptor in memory.
const MAX_GROUPS: u64 = 1 << 20;
const INCOMPAT_RECOVER: u32 = 0x4;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
/// Incompatible features our own reader reads (with `needs_recovery`, alone): file types in
/// entries, recovery, extents, 64-bit, flexible groups, a checksum seed. Any other is refused,
/// as ext4-view refuses it.
pub const INCOMPAT_OWN: u32 = 0x2 | 0x4 | 0x40 | 0x80 | 0x200 | 0x2000;

/// The geometry of one ext2/3/4 file system at `start` of the disk.
pub struct ExtFs {
    disk: Rc<Disk>,
    start: u64,
    pub block_size: u64,
    pub blocks: u64,
    pub inodes: u32,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    gdt_block: u64,
    /// The journal holds changes not yet written in place (a crashed or running guest): this
    /// reader sees the metadata as of the last checkpoint.
    pub needs_recovery: bool,
    /// The volume label and UUID (as `blkid` prints it).
    pub label: String,
    pub uuid: String,
    /// Incompatible features (`s_feature_incompat`).
    pub incompat: u32,
    /// Directory entries skipped for a name that is empty or holds `/` or NUL.
    pub bad_names: u64,
    cache: HashMap<u64, Rc<Vec<u8>>>,
    /// Pointers, extent entries and blocks this reader may still look at: bounded by the
    /// file system's size, so hostile maps cannot make it work without end.
    work: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Whether the 1 KiB at byte 1024 of a partition is an ext superblock.
pub fn is_ext(sb: &[u8]) -> bool {
    sb.len() >= 0x3A && le16(sb, 0x38) == 0xEF53
}

impl ExtFs {
    /// The file system of the partition `[start, start+len)`, its superblock checked.
    pub fn open(disk: Rc<Disk>, start: u64, len: u64) -> Result<ExtFs, String> {
        let sb = disk.read(start + 1024, 1024)?;
        if !is_ext(&sb) {
            return Err("no ext2/3/4 superblock".into());
        }
        let log = le32(&sb, 0x18);
        if log > 6 {
            return Err(format!("block size 1024 << {log} is out of range"));
        }
        let bs = 1024u64 << log;
        let incompat = le32(&sb, 0x60);
        if incompat & INCOMPAT_META_BG != 0 {
            return Err("meta_bg: not supported".into());
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let blocks = u64::from(le32(&sb, 0x4))
            | if is64 {
                u64::from(le32(&sb, 0x150)) << 32
            } else {
                0
            };
        let inodes = le32(&sb, 0x0);
        let ipg = le32(&sb, 0x28);
        let inode_size = if le32(&sb, 0x4C) == 0 {
            128
        } else {
            u64::from(le16(&sb, 0x58))
        };
        let desc_size = if is64 { u64::from(le16(&sb, 0xFE)) } else { 32 };
        let first = u64::from(le32(&sb, 0x14));
        if ipg == 0 || inodes == 0 {
            return Err("no inodes per group".into());
        }
        if !inode_size.is_power_of_two() || !(128..=bs).contains(&inode_size) {
            return Err(format!("inode size {inode_size} is out of range"));
        }
        if !desc_size.is_power_of_two() || !(32..=1024).contains(&desc_size) {
            return Err(format!("group descriptor size {desc_size} is out of range"));
        }
        if blocks.checked_mul(bs).is_none_or(|b| b > len) {
            return Err(format!(
                "{blocks} blocks of {bs} bytes do not fit the partition of {len} bytes"
            ));
        }
        // Group descriptors follow the superblock's block (the kernel's rule; not
        // s_first_data_block, which bigalloc with 1 KiB blocks sets to 0).
        let gdt_block = 1024 / bs + 1;
        let bpg = u64::from(le32(&sb, 0x20));
        // With bigalloc, a group has up to 8 x block size clusters of blocks.
        let ro_compat = le32(&sb, 0x64);
        let per_cluster = if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            let log_cluster = le32(&sb, 0x1C);
            if log_cluster < log || log_cluster - log > 16 {
                return Err(format!(
                    "cluster size 1024 << {log_cluster} is out of range"
                ));
            }
            1u64 << (log_cluster - log)
        } else {
            1
        };
        if !(8..=8 * bs * per_cluster).contains(&bpg) || first >= blocks {
            return Err(format!(
                "{bpg} blocks per group, first data block {first}: out of range"
            ));
        }
        let groups = (blocks - first).div_ceil(bpg);
        if groups > MAX_GROUPS {
            return Err(format!(
                "{groups} block groups, more than {MAX_GROUPS}: not read"
            ));
        }
        if u64::from(inodes) > groups * u64::from(ipg) {
            return Err(format!(
                "{inodes} inodes do not fit {groups} groups of {ipg}"
            ));
        }
        if (gdt_block + (groups * desc_size).div_ceil(bs)) * bs > len {
            return Err("the group descriptors do not fit the partition".into());
        }
        Ok(ExtFs {
            disk,
            start,
            block_size: bs,
            blocks,
            inodes,
            inodes_per_group: ipg,
            inode_size,
            desc_size,
            gdt_block,
            needs_recovery: incompat & INCOMPAT_RECOVER != 0,
            label: {
                let l = &sb[0x78..0x88];
                String::from_utf8_lossy(&l[..l.iter().position(|&b| b == 0).unwrap_or(16)])
                    .into_owned()
            },
            uuid: uuid(&sb[0x68..0x78]),
            incompat,
            bad_names: 0,
            cache: HashMap::new(),
            work: blocks.saturating_mul(4).clamp(1 << 24, 1 << 28),
        })
    }

    /// Disk byte of the start of fs block `b`.
    pub fn disk_offset(&self, b: u64) -> u64 {
        self.start + b * self.block_size
    }

    fn block(&mut self, b: u64) -> Result<Rc<Vec<u8>>, String> {
        if b >= self.blocks {
            return Err(format!("block {b} is past the end of the file system"));
        }
        if let Some(c) = self.cache.get(&b) {
            return Ok(c.clone());
        }
        self.charge(1)?;
        if self.cache.len() >= CACHE_BLOCKS {
            self.cache.clear();
        }
        let data = Rc::new(
            self.disk
                .read(self.disk_offset(b), self.block_size as usize)?,
        );
        self.cache.insert(b, data.clone());
        Ok(data)
    }

    fn charge(&mut self, n: u64) -> Result<(), String> {
        self.work = self.work.checked_sub(n).ok_or(
            "the file system's maps take more work than its size warrants: the rest not read",
        )?;
        Ok(())
    }

    /// Disk byte where inode `ino` lies (None: out of range or unreadable).
    pub fn inode_offset(&mut self, ino: u32) -> Option<u64> {
        self.inode_at(ino).ok().map(|at| self.start + at)
    }

    /// Byte of the file system where inode `ino` lies.
    fn inode_at(&mut self, ino: u32) -> Result<u64, String> {
        if ino == 0 || ino > self.inodes {
            return Err(format!("inode {ino} is out of range (1..={})", self.inodes));
        }
        let (group, idx) = (
            u64::from((ino - 1) / self.inodes_per_group),
            u64::from((ino - 1) % self.inodes_per_group),
        );
        let gd_at = self.gdt_block * self.block_size + group * self.desc_size;
        let gd = self.block(gd_at / self.block_size)?;
        let g = &gd[(gd_at % self.block_size) as usize..];
        let mut table = u64::from(le32(g, 8));
        if self.desc_size >= 64 {
            table |= u64::from(le32(g, 0x28)) << 32;
        }
        table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(idx * self.inode_size))
            .filter(|at| at / self.block_size < self.blocks)
            .ok_or_else(|| format!("inode {ino}: inode table block {table} is absurd"))
    }

    pub fn inode(&mut self, ino: u32) -> Result<RawInode, String> {
        let at = self.inode_at(ino)?;
        let blk = self.block(at / self.block_size)?;
        let i = &blk[(at % self.block_size) as usize..];
        Ok(RawInode {
            mode: le16(i, 0),
            flags: le32(i, 0x20),
            size: u64::from(le32(i, 4)) | u64::from(le32(i, 0x6C)) << 32,
            i_block: i[0x28..0x64].try_into().unwrap(),
            sectors: le32(i, 0x1C),
            xattr_block: le32(i, 0x68),
            uid: u32::from(le16(i, 0x2)) | u32::from(le16(i, 0x78)) << 16,
            gid: u32::from(le16(i, 0x18)) | u32::from(le16(i, 0x7A)) << 16,
            // Seconds are signed 32 bits, with two more epoch bits in i_mtime_extra when the
            // inode has room for it.
            mtime: i64::from(le32(i, 0x10) as i32)
                + if self.inode_size > 128 && le16(i, 0x80) >= 12 {
                    i64::from(le32(i, 0x88) & 3) << 32
                } else {
                    0
                },
        })
    }

    /// Inode `ino`'s data as pieces (byte in the file, disk start, disk end), in file order,
    /// the last cut at the file's size; holes between them read as zeros.
    pub fn data(&mut self, ino: u32) -> Result<(RawInode, Vec<Piece>), String> {
        let (inode, exts) = self.extents(ino)?;
        let bs = self.block_size;
        let pieces = exts
            .iter()
            .filter_map(|x| {
                let start = x.logical * bs;
                let end = ((x.logical + x.count) * bs).min(inode.size);
                let d = self.disk_offset(x.phys);
                (end > start).then_some((start, d, d + (end - start)))
            })
            .collect();
        Ok((inode, pieces))
    }

    /// The target of symlink `ino` (at most `max` bytes): in the inode itself when short
    /// (a fast symlink), else in its data block.
    pub fn link_target(&mut self, ino: u32, max: u64) -> Result<Vec<u8>, String> {
        let inode = self.inode(ino)?;
        if inode.mode & 0xF000 != 0xA000 {
            return Err(format!("inode {ino} is not a symlink"));
        }
        if inode.size > max {
            return Err(format!("a target of {} bytes", inode.size));
        }
        let n = inode.size as usize;
        // A fast symlink holds its target in the block map's place and owns no block but,
        // perhaps, one of extended attributes (e2fsprogs' `ext2fs_is_fast_symlink`).
        let xattr = if inode.xattr_block != 0 {
            (self.block_size / 512) as u32
        } else {
            0
        };
        if n < inode.i_block.len() && inode.sectors == xattr {
            return Ok(inode.i_block[..n].to_vec());
        }
        let (_, pieces) = self.data(ino)?;
        match pieces.first() {
            Some(&(0, d, e)) if e - d == inode.size => self.disk.read(d, n),
            _ => Err("its target's blocks do not match its size".into()),
        }
    }

    /// The blocks of inode `ino`'s data, in file order, adjacent runs merged; holes left out.
    pub fn extents(&mut self, ino: u32) -> Result<(RawInode, Vec<Ext>), String> {
        let inode = self.inode(ino)?;
        let mut out: Vec<Ext> = Vec::new();
        let nblocks = inode.size.div_ceil(self.block_size);
        if inode.flags & FLAG_INLINE != 0 || nblocks == 0 {
            return Ok((inode, out));
        }
        if inode.flags & FLAG_EXTENTS != 0 {
            self.extent_node(&inode.i_block, None, &mut out)?;
            out.retain(|e| e.logical < nblocks);
            if let Some(last) = out.last_mut() {
                last.count = last.count.min(nblocks - last.logical);
            }
        } else {
            let per = self.block_size / 4;
            let mut logical = 0u64;
            for k in 0..15usize {
                let level = k.saturating_sub(11);
                let ptr = u64::from(le32(&inode.i_block, k * 4));
                self.indirect(ptr, level as u32, per, &mut logical, nblocks, &mut out)?;
                if logical >= nblocks {
                    break;
                }
            }
        }
        Ok((inode, out))
    }

    fn push(&self, out: &mut Vec<Ext>, e: Ext) -> Result<(), String> {
        if e.phys
            .checked_add(e.count)
            .is_none_or(|end| end > self.blocks)
        {
            return Err(format!(
                "blocks {}+{} lie past the end of the file system",
                e.phys, e.count
            ));
        }
        let full = out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            Some(l) if l.logical + l.count == e.logical && l.phys + l.count == e.phys => {
                l.count += e.count
            }
            Some(l) if e.logical < l.logical + l.count => {
                return Err("extents overlap or go backwards".into())
            }
            _ if full => return Err(format!("more than {MAX_EXTENTS} extents")),
            _ => out.push(e),
        }
        Ok(())
    }

    fn extent_node(
        &mut self,
        b: &[u8],
        want_depth: Option<u16>,
        out: &mut Vec<Ext>,
    ) -> Result<(), String> {
        if le16(b, 0) != 0xF30A {
            return Err("extent header magic is wrong".into());
        }
        let (entries, depth) = (le16(b, 2) as usize, le16(b, 6));
        if entries > (b.len() - 12) / 12 || depth > 5 || want_depth.is_some_and(|d| d != depth) {
            return Err(format!(
                "extent node: {entries} entries at depth {depth} do not fit"
            ));
        }
        for k in 0..entries {
            self.charge(1)?;
            let e = &b[12 + 12 * k..24 + 12 * k];
            if depth == 0 {
                let len = u64::from(le16(e, 4));
                // Uninitialized (len > 32768): allocated, but reads as zeros; no data.
                if len == 0 || len > 32768 {
                    continue;
                }
                let phys = u64::from(le32(e, 8)) | u64::from(le16(e, 6)) << 32;
                let logical = u64::from(le32(e, 0));
                self.push(
                    out,
                    Ext {
                        logical,
                        phys,
                        count: len,
                    },
                )?;
            } else {
                let child = u64::from(le32(e, 4)) | u64::from(le16(e, 8)) << 32;
                let blk = self.block(child)?;
                self.extent_node(&blk, Some(depth - 1), out)?;
            }
        }
        Ok(())
    }

    fn indirect(
        &mut self,
        ptr: u64,
        level: u32,
        per: u64,
        logical: &mut u64,
        nblocks: u64,
        out: &mut Vec<Ext>,
    ) -> Result<(), String> {
        if ptr == 0 {
            *logical = logical.saturating_add(per.saturating_pow(level));
            return Ok(());
        }
        if level == 0 {
            self.push(
                out,
                Ext {
                    logical: *logical,
                    phys: ptr,
                    count: 1,
                },
            )?;
            *logical += 1;
            return Ok(());
        }
        let blk = self.block(ptr)?;
        // Scanning a block of pointers costs, even one read before (a hostile map can name
        // one block of zero pointers over and over): a step per 64 pointers.
        self.charge(per / 64 + 1)?;
        for k in 0..per as usize {
            if *logical >= nblocks {
                break;
            }
            // Zero pointers cost nothing more than the scan of their block.
            let p = u64::from(le32(&blk, k * 4));
            if p != 0 {
                self.charge(1)?;
            }
            self.indirect(p, level - 1, per, logical, nblocks, out)?;
        }
        Ok(())
    }

    /// The entries of directory `ino`: name -> inode number (at most [`MAX_DIR_BYTES`] of
    /// directory read), and the error that cut the listing short, if one did (the entries
    /// before it are kept). Every block is parsed as a linear directory (hash-tree nodes read
    /// as empty entries, as ext4 designed them).
    pub fn dir_entries(&mut self, ino: u32) -> (HashMap<Vec<u8>, u32>, Option<String>) {
        let mut out = HashMap::new();
        let err = self.dir_into(ino, &mut out).err();
        (out, err)
    }

    /// The inode of `path` (absolute, `/`-separated), looked up through our own directory
    /// reads (no journal replay); None: not there. A directory on the way that cannot be read
    /// whole is an error, not an absence.
    pub fn lookup(&mut self, path: &str) -> Result<Option<u32>, String> {
        let mut ino = 2;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let (names, err) = self.dir_entries(ino);
            match (names.get(part.as_bytes()), err) {
                (Some(&i), _) => ino = i,
                (None, None) => return Ok(None),
                (None, Some(e)) => return Err(e),
            }
        }
        Ok(Some(ino))
    }

    fn dir_into(&mut self, ino: u32, out: &mut HashMap<Vec<u8>, u32>) -> Result<(), String> {
        let before = self.work;
        let (inode, exts) = self.extents(ino)?;
        // A sound directory's map is a few nodes over its blocks; one far larger is refused
        // (ext4-view would walk it again for every path through it).
        let blocks: u64 = exts.iter().map(|e| e.count).sum();
        let steps = before - self.work;
        if steps > 2 * blocks + 64 {
            return Err(format!(
                "a block map of {steps} steps for {blocks} blocks: not read"
            ));
        }
        if !inode.is_dir() {
            return Err(format!("inode {ino} is not a directory"));
        }
        let bs = self.block_size as usize;
        let mut budget = MAX_DIR_BYTES / self.block_size;
        for e in exts {
            for k in 0..e.count {
                budget = budget.checked_sub(1).ok_or(format!(
                    "more than {MAX_DIR_BYTES} bytes of directory: the rest not read"
                ))?;
                let blk = self.block(e.phys + k)?;
                // Parsing costs, even a block read before (directories may share blocks).
                self.charge(self.block_size / 64)?;
                let mut pos = 0;
                while pos + 8 <= bs {
                    let (child, rec, nlen) = (
                        le32(&blk, pos),
                        rec_len(le16(&blk, pos + 4), bs),
                        blk[pos + 6] as usize,
                    );
                    if rec < 8 || rec % 4 != 0 || pos + rec > bs || nlen + 8 > rec {
                        return Err(format!("corrupt entry at block {} + {pos}", e.phys + k));
                    }
                    let name = &blk[pos + 8..pos + 8 + nlen];
                    if child != 0 && (name.is_empty() || name.contains(&b'/') || name.contains(&0))
                    {
                        self.bad_names += 1;
                    } else if child != 0 {
                        out.insert(name.to_vec(), child);
                    }
                    pos += rec;
                }
            }
        }
        Ok(())
    }
}

/// A directory record's length as stored: 64 KiB blocks need 17 bits (ext4's
/// `ext4_rec_len_from_disk`).
fn rec_len(v: u16, bs: usize) -> usize {
    if bs < 65536 {
        return v as usize;
    }
    match v {
        0 | 65535 => 65536,
        v => (v as usize & 65532) | ((v as usize & 3) << 16),
    }
}

/// A UUID as `blkid` prints it.
fn uuid(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
