//! Reading guest memory in chunks with the per-chunk scan (zero pages, checksums) on a
//! second thread, so it overlaps the writing of the previous chunk.
//!
//! The writer stays on the calling thread (it need not be `Send`). When the memory
//! source can be shared between threads ([`MemorySource::as_sync`]), the helper thread
//! also reads each chunk out of guest memory, and the calling thread only writes:
//!
//! ```text
//! caller:                        write N ─ write N+1 ─ write N+2 …
//! helper: read+scan N+1 ─ read+scan N+2 ─ read+scan N+3 …   (up to BUFFERS ahead)
//! ```
//!
//! Otherwise the calling thread reads too, and only the scan overlaps its writes.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::extents::Extent;
use crate::error::MigratableError;
use crate::memory::MemorySource;

/// Bytes of guest memory read per step (each of the [`BUFFERS`] buffers).
pub(crate) const CHUNK: usize = 1 << 20;

/// Chunk buffers in flight between the two threads.
const BUFFERS: usize = 4;

/// Memory at most this large is read and scanned on the calling thread (starting a
/// thread costs more than it saves).
const INLINE_MAX: u64 = 4 * CHUNK as u64;

/// One chunk of one extent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Job {
    /// Index of the extent.
    pub index: usize,
    /// The extent.
    pub extent: Extent,
    /// Offset of the chunk inside the extent.
    pub offset: u64,
    /// End (inside the extent) of the span of memory this chunk belongs to: the
    /// extent's length, or the end of a range the source says may hold data.
    pub end: u64,
    /// Whether this is its span's last chunk.
    pub last: bool,
}

impl Job {
    /// Bytes in this chunk.
    fn len(&self) -> usize {
        (self.end - self.offset).min(CHUNK as u64) as usize
    }
}

/// The spans of each extent to read, as (extent index, extent, start, end) inside the
/// extent: whole extents, or only where `memory` says data may be
/// ([`MemorySource::nonzero_ranges`]; elsewhere it is zero).
fn spans<'a>(
    extents: &'a [Extent],
    hint: &'a Option<Vec<crate::memory::MemoryRange>>,
) -> impl Iterator<Item = (usize, Extent, u64, u64)> + 'a {
    extents.iter().enumerate().flat_map(move |(index, e)| {
        let parts: Box<dyn Iterator<Item = (u64, u64)>> = match hint {
            None => Box::new(std::iter::once((0, e.length))),
            Some(h) => {
                let end = e.gpa + e.length;
                let first = h.partition_point(|r| r.gpa.saturating_add(r.length) <= e.gpa);
                Box::new(
                    h[first..]
                        .iter()
                        .take_while(move |r| r.gpa < end)
                        .filter_map(move |r| {
                            let lo = r.gpa.max(e.gpa);
                            let hi = r.gpa.saturating_add(r.length).min(end);
                            (lo < hi).then_some((lo - e.gpa, hi - e.gpa))
                        }),
                )
            }
        };
        parts.map(move |(lo, hi)| (index, *e, lo, hi))
    })
}

/// Reads every extent of `memory` in chunks of at most [`CHUNK`] bytes, in order (on
/// the helper thread if `memory` is [`Sync`](MemorySource::as_sync)).
/// For each chunk, `scan(job, bytes)` runs (on a helper thread when there is enough
/// memory to be worth it, always in chunk order), then `write(job, bytes, scanned)` on
/// the calling thread, in chunk order. The scan of a chunk overlaps the write of the
/// one before.
pub(crate) fn for_each_chunk<S: Send>(
    memory: &dyn MemorySource,
    extents: &[Extent],
    mut scan: impl FnMut(&Job, &[u8]) -> S + Send,
    mut write: impl FnMut(&Job, &[u8], S) -> Result<(), MigratableError>,
) -> Result<(), MigratableError> {
    let chunk = CHUNK as u64;
    let hint = memory.nonzero_ranges();
    let total: u64 = spans(extents, &hint).map(|(_, _, lo, hi)| hi - lo).sum();
    let mut jobs = spans(extents, &hint).flat_map(|(index, extent, lo, hi)| {
        (0..(hi - lo).div_ceil(chunk)).map(move |i| Job {
            index,
            extent,
            offset: lo + i * chunk,
            end: hi,
            last: lo + (i + 1) * chunk >= hi,
        })
    });
    let read = |job: &Job, buf: &mut Vec<u8>| -> Result<(), MigratableError> {
        let n = job.len();
        buf.resize(n, 0);
        memory
            .read_memory(job.extent.gpa + job.offset, buf)
            .map_err(MigratableError::Memory)
    };
    if total <= INLINE_MAX {
        let mut buf = Vec::with_capacity(CHUNK);
        for job in jobs {
            read(&job, &mut buf)?;
            let s = scan(&job, &buf);
            write(&job, &buf, s)?;
        }
        return Ok(());
    }

    // With a shareable source the helper reads; `read` then runs there.
    let sync = memory.as_sync();
    let read_sync = |job: &Job, buf: &mut Vec<u8>| -> Result<(), MigratableError> {
        let n = job.len();
        buf.resize(n, 0);
        match sync {
            Some(m) => m
                .read_memory(job.extent.gpa + job.offset, buf)
                .map_err(MigratableError::Memory),
            None => Ok(()),
        }
    };
    type ToScan = (Job, Vec<u8>);
    type Scanned<S> = (Job, Vec<u8>, Result<S, MigratableError>);
    let (to_helper, helper_in): (SyncSender<ToScan>, Receiver<ToScan>) = sync_channel(BUFFERS);
    let (helper_out, from_helper): (SyncSender<Scanned<S>>, Receiver<Scanned<S>>) =
        sync_channel(BUFFERS);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            // Ends when the caller drops its sender (done or failed) or stops receiving.
            for (job, mut buf) in helper_in {
                let s = read_sync(&job, &mut buf).map(|()| scan(&job, &buf));
                let failed = s.is_err();
                if helper_out.send((job, buf, s)).is_err() || failed {
                    break;
                }
            }
        });
        let helper_gone = || {
            MigratableError::Io(std::io::Error::other(
                "container writer: the scan thread stopped",
            ))
        };
        let mut spare: Vec<Vec<u8>> = (0..BUFFERS).map(|_| Vec::with_capacity(CHUNK)).collect();
        let mut in_flight = 0usize;
        loop {
            // Keep the helper fed: hand it the next chunk (read here if it cannot).
            if let Some(mut buf) = spare.pop() {
                if let Some(job) = jobs.next() {
                    if sync.is_none() {
                        read(&job, &mut buf)?;
                    }
                    if to_helper.send((job, buf)).is_err() {
                        // The helper stopped at a failed read: report that failure.
                        return Err(from_helper
                            .iter()
                            .find_map(|(_, _, s)| s.err())
                            .unwrap_or_else(helper_gone));
                    }
                    in_flight += 1;
                    continue;
                }
                spare.push(buf);
            }
            if in_flight == 0 {
                break;
            }
            let (job, buf, s) = from_helper.recv().map_err(|_| helper_gone())?;
            in_flight -= 1;
            write(&job, &buf, s?)?;
            spare.push(buf);
        }
        drop(to_helper);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryError, MemoryRange};

    /// Memory whose byte at `gpa` is `gpa % 251`; a read covering `fail_at` fails.
    struct Pattern {
        fail_at: Option<u64>,
        sync: bool,
    }

    impl MemorySource for Pattern {
        fn regions(&self) -> Vec<MemoryRange> {
            // `for_each_chunk` reads the extents it is given, not the regions.
            Vec::new()
        }

        fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            if let Some(f) = self.fail_at {
                if (gpa..gpa + buf.len() as u64).contains(&f) {
                    return Err(MemoryError::OutOfRange {
                        gpa,
                        length: buf.len() as u64,
                    });
                }
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((gpa + i as u64) % 251) as u8;
            }
            Ok(())
        }

        fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
            self.sync.then_some(self as &(dyn MemorySource + Sync))
        }
    }

    /// Two extents, together over the inline limit, the second not a whole chunk.
    fn extents() -> Vec<Extent> {
        vec![
            Extent {
                gpa: 0,
                length: 3 * CHUNK as u64,
                file_offset: 0,
            },
            Extent {
                gpa: 1 << 32,
                length: 2 * CHUNK as u64 + 8192,
                file_offset: 0,
            },
        ]
    }

    fn run(source: &Pattern) -> Result<Vec<(u64, usize)>, MigratableError> {
        let mut written = Vec::new();
        for_each_chunk(
            source,
            &extents(),
            |job, bytes| (job.extent.gpa + job.offset, bytes.to_vec()),
            |job, bytes, (gpa, copy)| {
                // The scan saw the bytes the writer gets, read from the job's address.
                assert_eq!(gpa, job.extent.gpa + job.offset);
                assert_eq!(bytes, &copy[..]);
                let mut want = vec![0; bytes.len()];
                Pattern {
                    fail_at: None,
                    sync: false,
                }
                .read_memory(gpa, &mut want)?;
                assert!(bytes == want, "chunk at {gpa:#x} holds other bytes");
                written.push((gpa, bytes.len()));
                Ok(())
            },
        )?;
        Ok(written)
    }

    #[test]
    fn every_chunk_is_written_in_order_whichever_thread_reads() {
        let want: Vec<(u64, usize)> = (0..3)
            .map(|i| (i * CHUNK as u64, CHUNK))
            .chain((0..2).map(|i| ((1 << 32) + i * CHUNK as u64, CHUNK)))
            .chain([((1 << 32) + 2 * CHUNK as u64, 8192)])
            .collect();
        for sync in [false, true] {
            let source = Pattern {
                fail_at: None,
                sync,
            };
            assert_eq!(run(&source).unwrap(), want, "sync: {sync}");
        }
    }

    #[test]
    fn a_failed_read_is_the_error_returned_whichever_thread_reads() {
        for sync in [false, true] {
            let source = Pattern {
                fail_at: Some((1 << 32) + CHUNK as u64 + 5),
                sync,
            };
            match run(&source) {
                Err(MigratableError::Memory(MemoryError::OutOfRange { gpa, .. })) => {
                    assert_eq!(gpa, (1 << 32) + CHUNK as u64, "sync: {sync}")
                }
                other => panic!("sync {sync}: {other:?}"),
            }
        }
    }
}
