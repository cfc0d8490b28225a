//! Reading guest memory in chunks with the per-chunk scan (zero pages, checksums) on a
//! second thread, so it overlaps the writing of the previous chunk.
//!
//! The memory source and the writer stay on the calling thread (neither is required to
//! be `Send`/`Sync`); only the chunk buffers and the scan move to the helper thread:
//!
//! ```text
//! caller: read N+1 ─ send ─ wait N ─ write N ─ read N+2 ─ send ─ wait N+1 ─ write N+1 …
//! helper:            scan N+1 ──────────────────────────  scan N+2 …
//! ```

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::extents::Extent;
use crate::memory::MemorySource;
use crate::MigratableError;

/// Bytes of guest memory read per step (each of the two buffers).
pub(crate) const CHUNK: usize = 1 << 20;

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
    /// Whether this is the extent's last chunk.
    pub last: bool,
}

/// Reads every extent of `memory` in chunks of at most [`CHUNK`] bytes, in order.
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
    let mut jobs = extents.iter().enumerate().flat_map(|(index, e)| {
        (0..e.length.div_ceil(chunk)).map(move |i| Job {
            index,
            extent: *e,
            offset: i * chunk,
            last: (i + 1) * chunk >= e.length,
        })
    });
    let read = |job: &Job, buf: &mut Vec<u8>| -> Result<(), MigratableError> {
        let n = (job.extent.length - job.offset).min(chunk) as usize;
        buf.resize(n, 0);
        memory
            .read_memory(job.extent.gpa + job.offset, buf)
            .map_err(MigratableError::Memory)
    };
    let total: u64 = extents.iter().map(|e| e.length).sum();
    if total <= INLINE_MAX {
        let mut buf = Vec::with_capacity(CHUNK);
        for job in jobs {
            read(&job, &mut buf)?;
            let s = scan(&job, &buf);
            write(&job, &buf, s)?;
        }
        return Ok(());
    }

    type ToScan = (Job, Vec<u8>);
    type Scanned<S> = (Job, Vec<u8>, S);
    let (to_helper, helper_in): (SyncSender<ToScan>, Receiver<ToScan>) = sync_channel(2);
    let (helper_out, from_helper): (SyncSender<Scanned<S>>, Receiver<Scanned<S>>) = sync_channel(2);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            // Ends when the caller drops its sender (done or failed) or stops receiving.
            for (job, buf) in helper_in {
                let s = scan(&job, &buf);
                if helper_out.send((job, buf, s)).is_err() {
                    break;
                }
            }
        });
        let helper_gone = || {
            MigratableError::Io(std::io::Error::other(
                "container writer: the scan thread stopped",
            ))
        };
        let mut spare = vec![Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK)];
        let mut in_flight = 0usize;
        loop {
            // Keep the helper fed: read the next chunk into a free buffer.
            if let Some(mut buf) = spare.pop() {
                if let Some(job) = jobs.next() {
                    read(&job, &mut buf)?;
                    to_helper.send((job, buf)).map_err(|_| helper_gone())?;
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
            write(&job, &buf, s)?;
            spare.push(buf);
        }
        drop(to_helper);
        Ok(())
    })
}
