//! The compacted file's cluster allocation, refcounts and packed compressed stream.

/// Where a content is stored: the L2 entry (without COPIED) and the host clusters it touches.
#[derive(Clone, Copy)]
pub(super) struct Stored {
    pub(super) entry: u64,
    pub(super) first: u64,
    pub(super) last: u64,
}

/// The new file's cluster allocation, refcounts and packed compressed stream.
pub(super) struct Layout {
    pub(super) cs: u64,
    /// Refcount of each host cluster so far; its length is the next free cluster.
    pub(super) rc: Vec<u64>,
    /// Next byte of the compressed stream, and the end of the clusters it owns.
    pub(super) cpos: u64,
    pub(super) cend: u64,
    pub(super) limit: u64,
}

impl Layout {
    pub(super) fn alloc(&mut self) -> u64 {
        self.rc.push(0);
        self.rc.len() as u64 - 1
    }
    pub(super) fn end(&self) -> u64 {
        self.rc.len() as u64 * self.cs
    }
    /// Byte offset for `len` compressed bytes: packed after the previous ones, spanning into
    /// the next cluster when the stream is at the end of the file.
    pub(super) fn place_blob(&mut self, len: u64) -> u64 {
        // A stream cluster already counted to the limit (a content shared that often, now
        // stored again) takes no more blobs: start a new one.
        let last = self.cend / self.cs;
        if self.cend > 0 && self.rc[(last - 1) as usize] >= self.limit {
            self.cpos = self.cend;
        }
        if self.cpos + len > self.cend && self.cend != self.end() {
            // Plain clusters follow the stream's last cluster: start a new one.
            self.cpos = self.end();
            self.cend = self.cpos;
        }
        while self.cpos + len > self.cend {
            self.alloc();
            self.cend += self.cs;
        }
        let at = self.cpos;
        self.cpos += len;
        at
    }
    pub(super) fn can_share(&self, s: &Stored) -> bool {
        (s.first..=s.last).all(|c| self.rc[c as usize] < self.limit)
    }
    pub(super) fn reference(&mut self, s: &Stored) {
        for c in s.first..=s.last {
            self.rc[c as usize] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(meta: usize) -> Layout {
        Layout {
            cs: 4096,
            rc: vec![1; meta],
            cpos: 0,
            cend: 0,
            limit: 3,
        }
    }

    #[test]
    fn blobs_pack_and_span_only_at_the_end() {
        let mut l = layout(3);
        assert_eq!(l.place_blob(3000), 3 * 4096);
        // Spans into a new cluster: the stream is at the end of the file.
        assert_eq!(l.place_blob(3000), 3 * 4096 + 3000);
        assert_eq!(l.rc.len(), 5);
        // A plain cluster after the stream: the next blob that does not fit starts afresh...
        assert_eq!(l.alloc(), 5);
        assert_eq!(l.place_blob(3000), 6 * 4096);
        // ...but one that fits in the stream's last cluster still goes there.
        assert_eq!(l.alloc(), 7);
        assert_eq!(l.place_blob(1000), 6 * 4096 + 3000);
    }

    #[test]
    fn sharing_stops_at_the_refcount_limit() {
        let mut l = layout(1);
        let c = l.alloc();
        let s = Stored {
            entry: c * 4096,
            first: c,
            last: c,
        };
        for _ in 0..3 {
            assert!(l.can_share(&s));
            l.reference(&s);
        }
        assert!(!l.can_share(&s));
    }

    #[test]
    fn a_stream_cluster_at_the_limit_takes_no_more_blobs() {
        let mut l = layout(1);
        let at = l.place_blob(100);
        let s = Stored {
            entry: at,
            first: at / 4096,
            last: at / 4096,
        };
        for _ in 0..3 {
            l.reference(&s);
        }
        // The content is stored again: its blob must not land in the cluster at the limit.
        let again = l.place_blob(100);
        assert_ne!(
            again / 4096,
            s.first,
            "blob placed in a cluster at the limit"
        );
        assert_eq!(again, (s.first + 1) * 4096);
    }
}
