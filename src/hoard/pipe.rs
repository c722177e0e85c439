//! Frames compressed by worker threads and written to packs in order: what `hoard add` and
//! `hoard gc` share. The caller reads, hashes and decides (one thread); workers compress; the
//! caller's thread writes finished frames as they come back, in sequence, one pack after
//! another.

use super::format::Key;
use super::store::{encode_frame, Hoard, PackWriter};
use crate::format::ext::hex;
use crate::{Error, Result, Subject};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Most chunks in one pack (1 GiB before compression): writers start a new pack there.
pub const PACK_CHUNKS: u32 = 1 << 18;

struct Job {
    seq: u64,
    pack: u32,
    raw: Vec<u8>,
    keys: Vec<Key>,
}

struct Done {
    seq: u64,
    pack: u32,
    stored: Vec<u8>,
    codec: super::format::Codec,
    hash: [u8; 32],
    keys: Vec<Key>,
}

/// What the pipeline wrote: pack ids by the caller's pack numbers, and their bytes.
#[derive(Debug, Default)]
pub struct Written {
    pub ids: HashMap<u32, [u8; 32]>,
    pub bytes: u64,
}

/// Frames back from the workers, written in sequence.
struct Sink<'h> {
    hoard: &'h Hoard,
    pending: BTreeMap<u64, Done>,
    next: u64,
    writer: Option<(u32, PackWriter)>,
    out: Written,
}

impl Sink<'_> {
    fn take(&mut self, d: Done) -> Result<()> {
        self.pending.insert(d.seq, d);
        while let Some(d) = self.pending.remove(&self.next) {
            self.next += 1;
            if self.writer.as_ref().is_some_and(|(p, _)| *p != d.pack) {
                self.finish_pack()?;
            }
            if self.writer.is_none() {
                self.writer = Some((d.pack, PackWriter::create(self.hoard)?));
            }
            let (_, w) = self.writer.as_mut().unwrap();
            w.push(&d.stored, d.codec, d.hash, &d.keys)?;
        }
        Ok(())
    }

    fn finish_pack(&mut self) -> Result<()> {
        if let Some((p, w)) = self.writer.take() {
            let frames = w.len();
            if let Some(id) = w.finish()? {
                self.out.ids.insert(p, id);
                self.out.bytes +=
                    std::fs::metadata(self.hoard.pack_path(&id)).map_or(frames, |m| m.len());
                log::debug!("hoard: wrote pack {}", hex(&id));
            }
        }
        Ok(())
    }
}

/// The caller's end of the pipeline.
pub struct Pipe<'h> {
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    seq: u64,
    sink: Sink<'h>,
}

impl Pipe<'_> {
    /// Send a frame of `keys.len()` chunks (`raw`) for pack number `pack` (packs are
    /// written one after another: numbers must not go back).
    pub fn push(&mut self, pack: u32, raw: Vec<u8>, keys: Vec<Key>) -> Result<()> {
        let job = Job {
            seq: self.seq,
            pack,
            raw,
            keys,
        };
        self.seq += 1;
        self.jobs.send(job).map_err(|_| {
            Error::refused(
                Subject::Other(format!("hoard {}", self.sink.hoard.dir().display())),
                "compression workers stopped",
            )
        })?;
        while let Ok(d) = self.done.try_recv() {
            self.sink.take(d)?;
        }
        Ok(())
    }
}

/// Run `f` with a pipeline compressing at zstd `level` on all cores; when `f` succeeds, wait
/// for every frame and finish the last pack. On an error nothing half-written is kept (the
/// temporary pack is removed; packs already finished stay, unreferenced, for gc).
pub fn with_pipe<R>(
    hoard: &Hoard,
    level: i32,
    f: impl FnOnce(&mut Pipe) -> Result<R>,
) -> Result<(R, Written)> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let (job_tx, job_rx) = sync_channel::<Job>(2 * workers);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = channel::<Done>();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            s.spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                let (stored, codec, hash) = encode_frame(&job.raw, level);
                let d = Done {
                    seq: job.seq,
                    pack: job.pack,
                    stored,
                    codec,
                    hash,
                    keys: job.keys,
                };
                if tx.send(d).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let mut pipe = Pipe {
            jobs: job_tx,
            done: done_rx,
            seq: 0,
            sink: Sink {
                hoard,
                pending: BTreeMap::new(),
                next: 0,
                writer: None,
                out: Written::default(),
            },
        };
        let r = f(&mut pipe);
        let Pipe {
            jobs,
            done,
            mut sink,
            ..
        } = pipe;
        // The workers stop once the queue is empty; take what they finish.
        drop(jobs);
        for d in done.iter() {
            if r.is_ok() {
                sink.take(d)?;
            }
        }
        let r = r?;
        sink.finish_pack()?;
        Ok((r, sink.out))
    })
}
