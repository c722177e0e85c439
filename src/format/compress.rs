//! Compressed clusters: raw deflate (window bits 12, no zlib header) and zstd, decoded until
//! the cluster is full. Trailing bytes after the stream (sector padding) are ignored, as QEMU
//! ignores them.

use super::header::CompressionType;

/// Decompress `input` into `out` (exactly one cluster). Err names what went wrong.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new_with_window_bits(false, 12);
    loop {
        let (i, o) = (d.total_in() as usize, d.total_out() as usize);
        let st = d
            .decompress(&input[i..], &mut out[o..], FlushDecompress::Finish)
            .map_err(|e| format!("deflate: {e}"))?;
        let filled = d.total_out() as usize == out.len();
        match st {
            Status::StreamEnd if filled => return Ok(()),
            Status::StreamEnd => {
                return Err("deflate stream ends before the cluster is full".into())
            }
            _ if filled => return Ok(()),
            _ if d.total_in() as usize == input.len()
                || (d.total_in() as usize == i && d.total_out() as usize == o) =>
            {
                return Err("deflate stream truncated".into())
            }
            _ => {}
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    // QEMU (qcow2_zstd_decompress) streams until the output is full; the input may carry
    // padding after the frame.
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = d
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("zstd: {e}"))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 && inb.pos() == input.len() {
            return Err("zstd frame ends before the cluster is full".into());
        }
        if (inb.pos(), outb.pos()) == before {
            return Err("zstd stream truncated".into());
        }
    }
}

/// Compress one cluster the way QEMU does; None if it does not shrink.
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Deflate => {
            use flate2::{Compress, Compression, FlushCompress, Status};
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => out,
                _ => return None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() < input.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_both() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for k in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut c = compress(k, &data).unwrap();
            c.extend_from_slice(&[0xAA; 300]); // sector padding
            let mut out = vec![0u8; data.len()];
            decompress(k, &c, &mut out).unwrap();
            assert_eq!(out, data);
            let mut out = vec![0u8; data.len()];
            assert!(decompress(k, &c[..c.len() / 3], &mut out).is_err());
        }
    }
}
