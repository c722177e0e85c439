//! Partition tables (MBR with its extended chain, GPT) and where the file systems are: pure
//! parsing of sectors handed in by a read function, every number checked against the disk.

use super::Warnings;

/// Where a file system may lie on the disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Partition {
    /// 1-based as Linux numbers them (`vda1`); 0 for a file system on the whole disk.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// `mbr 0x83`, `gpt Linux filesystem`, `whole disk`.
    pub kind: String,
    /// The GPT partition name, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl Partition {
    fn new(number: u32, start: u64, len: u64, kind: String) -> Partition {
        Partition {
            number,
            start,
            len,
            kind,
            name: String::new(),
        }
    }
}

/// Reads `len` bytes at `off` of the disk (None: could not be read).
pub type ReadFn<'a> = dyn FnMut(u64, usize) -> Option<Vec<u8>> + 'a;

const MAX_LOGICAL: usize = 128;
const MAX_GPT_ENTRIES: u32 = 1024;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

/// The partitions of a disk of `disk_len` bytes; a disk with no partition table is one
/// "whole disk" partition. What does not fit the disk is left out with a warning.
pub fn partitions(read: &mut ReadFn<'_>, disk_len: u64, warn: &mut Warnings) -> Vec<Partition> {
    let whole = || vec![Partition::new(0, 0, disk_len, "whole disk".into())];
    let Some(mbr) = read(0, 512) else {
        warn.push("sector 0 cannot be read: no partition table looked for");
        return whole();
    };
    if mbr.len() < 512 || mbr[510] != 0x55 || mbr[511] != 0xAA {
        return whole();
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
        })
        .collect();
    // A boot sector that names no partition at all (a file system whose first sector happens
    // to end in 55 AA) is no table.
    if entries.iter().all(|e| e.0 == 0) {
        return whole();
    }
    if entries.iter().any(|e| e.0 == 0xEE) {
        if let Some(gpt) = gpt(read, disk_len, warn) {
            return gpt;
        }
        warn.push("protective MBR without a valid GPT: the MBR's entries are used");
    }
    let mut out = Vec::new();
    for (i, &(kind, lba, count)) in entries.iter().enumerate() {
        if kind == 0 || count == 0 {
            continue;
        }
        if matches!(kind, 0x05 | 0x0F | 0x85) {
            logical(read, disk_len, lba, count, &mut out, warn);
            continue;
        }
        let p = Partition::new(
            i as u32 + 1,
            lba * 512,
            count * 512,
            format!("mbr 0x{kind:02x}"),
        );
        push_checked(&mut out, disk_len, warn, p);
    }
    out
}

fn push_checked(out: &mut Vec<Partition>, disk_len: u64, warn: &mut Warnings, p: Partition) {
    match p.start.checked_add(p.len) {
        Some(end) if end <= disk_len => out.push(p),
        _ => warn.push(format!(
            "partition {} ({}) lies past the end of the disk ({} + {} > {disk_len} bytes): skipped",
            p.number, p.kind, p.start, p.len
        )),
    }
}

/// The logical partitions of an extended partition at `ext_lba`: a chain of boot records, each
/// naming one partition and the next record; a chain that does not move forward is cut.
fn logical(
    read: &mut ReadFn<'_>,
    disk_len: u64,
    ext_lba: u64,
    ext_count: u64,
    out: &mut Vec<Partition>,
    warn: &mut Warnings,
) {
    let mut ebr = ext_lba;
    for _ in 0..MAX_LOGICAL {
        if ebr >= ext_lba + ext_count || ebr * 512 >= disk_len {
            warn.push(format!(
                "extended boot record at sector {ebr} lies outside its partition"
            ));
            return;
        }
        let Some(b) = read(ebr * 512, 512) else {
            warn.push(format!(
                "extended boot record at sector {ebr} cannot be read"
            ));
            return;
        };
        if b.len() < 512 || b[510] != 0x55 || b[511] != 0xAA {
            warn.push(format!(
                "no boot record signature at sector {ebr}: logical partitions cut short"
            ));
            return;
        }
        let (kind, rel, count) = (
            b[446 + 4],
            u64::from(le32(&b, 446 + 8)),
            u64::from(le32(&b, 446 + 12)),
        );
        if kind != 0 && count != 0 {
            let number = 5 + out.iter().filter(|p| p.number >= 5).count() as u32;
            let p = Partition::new(
                number,
                (ebr + rel) * 512,
                count * 512,
                format!("mbr 0x{kind:02x}"),
            );
            push_checked(out, disk_len, warn, p);
        }
        let next = u64::from(le32(&b, 462 + 8));
        if b[462 + 4] == 0 || next == 0 {
            return;
        }
        if ext_lba + next <= ebr {
            warn.push(format!(
                "extended boot records loop back at sector {}: cut",
                ext_lba + next
            ));
            return;
        }
        ebr = ext_lba + next;
    }
    warn.push(format!(
        "more than {MAX_LOGICAL} logical partitions: the rest left out"
    ));
}

/// The GPT of the disk (512-byte sectors, then 4096), or None with a warning.
fn gpt(read: &mut ReadFn<'_>, disk_len: u64, warn: &mut Warnings) -> Option<Vec<Partition>> {
    for sector in [512u64, 4096] {
        let Some(h) = read(sector, sector as usize) else {
            continue;
        };
        if h.len() < 92 || &h[0..8] != b"EFI PART" {
            continue;
        }
        let hsize = le32(&h, 12) as usize;
        if !(92..=h.len()).contains(&hsize) {
            warn.push(format!("GPT header size {hsize} is out of range"));
            return None;
        }
        let mut copy = h[..hsize].to_vec();
        copy[16..20].fill(0);
        if crc32(&copy) != le32(&h, 16) {
            warn.push("GPT header checksum does not match");
            return None;
        }
        let (entries_lba, count, size) = (le64(&h, 72), le32(&h, 80), le32(&h, 84));
        if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&size) || size % 8 != 0 {
            warn.push(format!(
                "GPT names {count} entries of {size} bytes: refused"
            ));
            return None;
        }
        let bytes = count as usize * size as usize;
        let at = entries_lba.checked_mul(sector)?;
        if at.checked_add(bytes as u64).is_none_or(|e| e > disk_len) {
            warn.push("GPT entries lie past the end of the disk");
            return None;
        }
        let table = read(at, bytes)?;
        if table.len() < bytes || crc32(&table) != le32(&h, 88) {
            warn.push("GPT entry array checksum does not match");
            return None;
        }
        let mut out = Vec::new();
        for i in 0..count as usize {
            let e = &table[i * size as usize..(i + 1) * size as usize];
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let (first, last) = (le64(e, 32), le64(e, 40));
            if last < first {
                warn.push(format!("GPT entry {}: ends before it starts", i + 1));
                continue;
            }
            let name: Vec<u16> = (0..36)
                .map(|k| le16(e, 56 + 2 * k))
                .take_while(|&c| c != 0)
                .collect();
            let (Some(start), Some(len)) = (
                first.checked_mul(sector),
                (last - first)
                    .checked_add(1)
                    .and_then(|n| n.checked_mul(sector)),
            ) else {
                warn.push(format!("GPT entry {}: absurd sector numbers", i + 1));
                continue;
            };
            let p = Partition {
                name: String::from_utf16_lossy(&name),
                ..Partition::new(
                    i as u32 + 1,
                    start,
                    len,
                    format!("gpt {}", gpt_type(&e[..16])),
                )
            };
            push_checked(&mut out, disk_len, warn, p);
        }
        return Some(out);
    }
    None
}

/// A GPT type GUID as it is written (mixed endian) and, when known, its name.
fn gpt_type(g: &[u8]) -> String {
    let text = format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    );
    let name = match text.as_str() {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        _ => return text,
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: usize) -> Vec<u8> {
        vec![0u8; size]
    }

    fn reader(d: &[u8]) -> impl FnMut(u64, usize) -> Option<Vec<u8>> + '_ {
        move |off, len| {
            let off = usize::try_from(off).ok()?;
            d.get(off..off.checked_add(len)?).map(|s| s.to_vec())
        }
    }

    #[test]
    fn no_table_is_the_whole_disk() {
        let d = disk(4096);
        let mut w = Warnings::default();
        let p = partitions(&mut reader(&d), 4096, &mut w);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].number, 0);
    }

    #[test]
    fn mbr_entry_past_the_end_is_skipped_with_a_warning() {
        let mut d = disk(1 << 20);
        d[510] = 0x55;
        d[511] = 0xAA;
        let e = 446;
        d[e + 4] = 0x83;
        d[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut w = Warnings::default();
        let p = partitions(&mut reader(&d), 1 << 20, &mut w);
        assert!(p.is_empty());
        assert!(w.0[0].contains("past the end"), "{:?}", w.0);
    }

    #[test]
    fn extended_chain_that_loops_is_cut() {
        let mut d = disk(1 << 20);
        d[510] = 0x55;
        d[511] = 0xAA;
        d[446 + 4] = 0x05;
        d[446 + 8..446 + 12].copy_from_slice(&100u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&1000u32.to_le_bytes());
        let ebr = 100 * 512;
        d[ebr + 510] = 0x55;
        d[ebr + 511] = 0xAA;
        d[ebr + 446 + 4] = 0x83;
        d[ebr + 446 + 8..ebr + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[ebr + 446 + 12..ebr + 446 + 16].copy_from_slice(&10u32.to_le_bytes());
        d[ebr + 462 + 4] = 0x05;
        d[ebr + 462 + 8..ebr + 462 + 12].copy_from_slice(&5u32.to_le_bytes());
        // The second record points back before itself.
        let ebr2 = 105 * 512;
        d[ebr2 + 510] = 0x55;
        d[ebr2 + 511] = 0xAA;
        d[ebr2 + 446 + 4] = 0x83;
        d[ebr2 + 446 + 8..ebr2 + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[ebr2 + 446 + 12..ebr2 + 446 + 16].copy_from_slice(&2u32.to_le_bytes());
        d[ebr2 + 462 + 4] = 0x05;
        d[ebr2 + 462 + 8..ebr2 + 462 + 12].copy_from_slice(&3u32.to_le_bytes());
        let mut w = Warnings::default();
        let p = partitions(&mut reader(&d), 1 << 20, &mut w);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].number, p[1].number), (5, 6));
        assert!(w.0.iter().any(|m| m.contains("loop")), "{:?}", w.0);
    }

    #[test]
    fn gpt_entry_with_absurd_sectors_is_skipped() {
        let mut d = disk(1 << 20);
        d[446 + 4] = 0xEE;
        d[510] = 0x55;
        d[511] = 0xAA;
        let mut entries = vec![0u8; 128 * 128];
        entries[0] = 1; // any type
        entries[32..40].copy_from_slice(&0u64.to_le_bytes());
        entries[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        let h = 512;
        d[h..h + 8].copy_from_slice(b"EFI PART");
        d[h + 12..h + 16].copy_from_slice(&92u32.to_le_bytes());
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        d[h + 88..h + 92].copy_from_slice(&crc32(&entries).to_le_bytes());
        let c = crc32(&d[h..h + 92]);
        d[h + 16..h + 20].copy_from_slice(&c.to_le_bytes());
        d[1024..1024 + entries.len()].copy_from_slice(&entries);
        let mut w = Warnings::default();
        let p = partitions(&mut reader(&d), 1 << 20, &mut w);
        assert!(p.is_empty(), "{p:?}");
        assert!(w.0.iter().any(|m| m.contains("absurd")), "{:?}", w.0);
    }
}
