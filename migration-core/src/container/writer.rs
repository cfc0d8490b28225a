//! Writing containers: the file form (seekable, sparse) and the stream form.

use std::io::{Seek, SeekFrom, Write};

use super::chunk_pipeline::{for_each_chunk, Job, CHUNK};
use super::error::FormatError;
use super::extents::{encode_run_table, DataRun, Extent};
use super::header::{Form, Header, FORMAT_MAJOR, FORMAT_MINOR, HEADER_LEN};
use super::limits;
use super::metadata::{self, Tree};
use crate::arch::Arch;
use crate::checksum::Crc64;
use crate::error::MigratableError;
use crate::memory::{page_runs, MemorySource, PageRun, PAGE_SIZE};
use crate::snapshot::Snapshot;

// A chunk is the largest DATA record of the stream form.
const _: () = assert!(CHUNK as u64 <= limits::MAX_RECORD_LEN);

/// Choices a writer makes that are not in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Target architecture recorded in the header.
    pub arch: Arch,
    /// Base snapshot of an incremental snapshot (reserved: sets HAS_PARENT).
    pub parent: Option<[u8; 32]>,
    /// Producing crate's name (≤ 31 bytes).
    pub producer_name: String,
    /// Producing crate's version (≤ 23 bytes).
    pub producer_version: String,
}

impl Default for WriteOptions {
    /// This host's architecture, no parent, produced by this crate.
    fn default() -> Self {
        Self {
            arch: Arch::host(),
            parent: None,
            producer_name: env!("CARGO_PKG_NAME").into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// What a write produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Length of the container (file form: the file's length, holes included; stream
    /// form: bytes written).
    pub total_length: u64,
    /// Guest memory bytes covered by extents.
    pub memory_bytes: u64,
    /// Non-zero guest memory bytes written.
    pub data_bytes: u64,
    /// Data runs (file form) or DATA records (stream form).
    pub runs: u64,
}

fn io_err(e: std::io::Error) -> MigratableError {
    MigratableError::Io(e)
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The extents for `memory`'s regions, with file offsets from `first_offset` on
/// (`None`: stream form, offsets 0).
fn extents_for(
    memory: Option<&dyn MemorySource>,
    first_offset: Option<u64>,
) -> Result<Vec<Extent>, MigratableError> {
    let Some(memory) = memory else {
        return Ok(Vec::new());
    };
    let mut extents = Vec::new();
    let mut next_file = first_offset;
    let mut prev_end = 0u64;
    for (i, r) in memory.regions().into_iter().enumerate() {
        if r.length == 0 {
            continue;
        }
        if r.gpa % PAGE_SIZE != 0 || r.length % PAGE_SIZE != 0 {
            return Err(FormatError::Unwritable {
                what: format!("memory region {i} {r:x?} is not page aligned"),
            }
            .into());
        }
        let end = r
            .end()
            .filter(|&e| e <= u64::MAX - PAGE_SIZE)
            .ok_or_else(|| FormatError::Unwritable {
                what: format!("memory region {i} {r:x?} wraps"),
            })?;
        if !extents.is_empty() && r.gpa < prev_end {
            return Err(FormatError::Unwritable {
                what: format!("memory region {i} {r:x?} overlaps or is out of order"),
            }
            .into());
        }
        prev_end = end;
        let file_offset = next_file.unwrap_or(0);
        if let Some(n) = &mut next_file {
            *n += r.length;
        }
        extents.push(Extent {
            gpa: r.gpa,
            length: r.length,
            file_offset,
        });
    }
    Ok(extents)
}

/// The header for `tree` with `extents` extents (its lengths depend on nothing else).
fn header_for(
    tree: &Tree<'_>,
    extents: usize,
    form: Form,
    options: &WriteOptions,
) -> Result<Header, MigratableError> {
    let header = Header {
        major: FORMAT_MAJOR,
        minor: FORMAT_MINOR,
        form,
        arch: options.arch,
        parent: options.parent,
        metadata_length: tree.block_len(extents),
        payload_length: tree.payload_len(),
        run_table_offset: 0,
        run_table_length: 0,
        total_length: 0,
        producer_name: options.producer_name.clone(),
        producer_version: options.producer_version.clone(),
    };
    header.encode()?; // reject bad producer strings before writing anything
    Ok(header)
}

/// Writes `snapshot` and, if given, all of `memory` in the **file form** to `w`,
/// starting at `w`'s current position. `w` must be seekable (normally a `File`):
/// zero pages are seeked over, leaving holes, and the header is written last.
///
/// Every section must be encoded ([`Snapshot::encode`]); memory is read through a
/// few 1 MiB buffers, never as a whole: zero pages and checksums of the next chunks
/// are found on a helper thread (which also reads them out of a
/// [`Sync`](MemorySource::as_sync) source) while this thread writes.
pub fn write_snapshot<W: Write + Seek>(
    w: &mut W,
    snapshot: &Snapshot,
    memory: Option<&dyn MemorySource>,
    options: &WriteOptions,
) -> Result<WriteSummary, MigratableError> {
    let base = w.stream_position().map_err(io_err)?;
    // The metadata's length does not depend on the extents' file offsets: the header
    // says where memory starts, then the extents move there.
    let tree = metadata::encode(snapshot)?;
    let mut extents = extents_for(memory, Some(0))?;
    let mut header = header_for(&tree, extents.len(), Form::File, options)?;
    let first = align_up(header.payload_end(), PAGE_SIZE);
    for e in &mut extents {
        e.file_offset += first;
    }
    let metadata = tree.block(&extents)?;

    w.write_all(&[0u8; HEADER_LEN]).map_err(io_err)?;
    w.write_all(&metadata).map_err(io_err)?;
    for payload in &tree.payloads {
        w.write_all(payload).map_err(io_err)?;
    }
    let mut summary = WriteSummary::default();
    let mut runs: Vec<DataRun> = Vec::new();
    if let Some(memory) = memory {
        summary.memory_bytes = extents.iter().map(|e| e.length).sum();
        // Scan (helper thread): the chunk's non-zero spans, and the data runs they
        // close, with the CRC of the run still open carried from chunk to chunk.
        let mut open: Option<(u64, Crc64)> = None; // run start offset in its extent, its CRC
        let runs_out = &mut runs;
        let scan = move |job: &Job, chunk: &[u8]| {
            let mut spans = Vec::new();
            let e = &job.extent;
            for PageRun { offset, len, zero } in page_runs(chunk) {
                let at = job.offset + offset as u64;
                if zero {
                    if let Some((s, crc)) = open.take() {
                        runs_out.push(run(job.index, e, s, at - s, crc.finish()));
                    }
                } else {
                    let (_, crc) = open.get_or_insert_with(|| (at, Crc64::new()));
                    crc.update(&chunk[offset..offset + len]);
                    spans.push((offset, len));
                }
            }
            if job.last {
                if let Some((s, crc)) = open.take() {
                    runs_out.push(run(job.index, e, s, job.end - s, crc.finish()));
                }
            }
            spans
        };
        // Write (this thread): each non-zero span at its offset; zero pages are
        // seeked over and stay holes.
        let mut pos: Option<u64> = None; // where `w` is, if known
        let write = |job: &Job, chunk: &[u8], spans: Vec<(usize, usize)>| {
            for (start, len) in spans {
                let at = base + job.extent.file_offset + job.offset + start as u64;
                if pos != Some(at) {
                    w.seek(SeekFrom::Start(at)).map_err(io_err)?;
                }
                w.write_all(&chunk[start..start + len]).map_err(io_err)?;
                pos = Some(at + len as u64);
                summary.data_bytes += len as u64;
            }
            Ok(())
        };
        for_each_chunk(memory, &extents, scan, write)?;
    }
    if runs.len() as u64 > limits::MAX_RUNS {
        return Err(FormatError::Unwritable {
            what: format!("{} data runs, over {}", runs.len(), limits::MAX_RUNS),
        }
        .into());
    }
    let data_end = extents
        .last()
        .map_or(header.payload_end(), |e| e.file_offset + e.length);
    let table = encode_run_table(&runs);
    header.run_table_offset = align_up(data_end, 8);
    header.run_table_length = table.len() as u64;
    header.total_length = header.run_table_offset + table.len() as u64;
    w.seek(SeekFrom::Start(base + header.run_table_offset))
        .map_err(io_err)?;
    w.write_all(&table).map_err(io_err)?;
    w.seek(SeekFrom::Start(base)).map_err(io_err)?;
    w.write_all(&header.encode()?).map_err(io_err)?;
    w.seek(SeekFrom::Start(base + header.total_length))
        .map_err(io_err)?;
    w.flush().map_err(io_err)?;
    summary.total_length = header.total_length;
    summary.runs = runs.len() as u64;
    Ok(summary)
}

fn run(index: usize, e: &Extent, offset: u64, length: u64, crc: u64) -> DataRun {
    DataRun {
        extent: index as u32,
        offset,
        length,
        crc,
        gpa: e.gpa + offset,
        file_offset: e.file_offset + offset,
    }
}

/// Writes `snapshot` and, if given, all of `memory` in the **stream form** to `w`
/// (a socket or pipe: no seeking). Zero pages are not sent. Returns after the END
/// record; the caller flushes.
pub fn write_snapshot_stream<W: Write>(
    w: &mut W,
    snapshot: &Snapshot,
    memory: Option<&dyn MemorySource>,
    options: &WriteOptions,
) -> Result<WriteSummary, MigratableError> {
    let extents = extents_for(memory, None)?;
    let tree = metadata::encode(snapshot)?;
    let header = header_for(&tree, extents.len(), Form::Stream, options)?;
    let metadata = tree.block(&extents)?;
    w.write_all(&header.encode()?).map_err(io_err)?;
    w.write_all(&metadata).map_err(io_err)?;
    for payload in &tree.payloads {
        w.write_all(payload).map_err(io_err)?;
    }
    let mut summary = WriteSummary {
        total_length: header.payload_end(),
        ..WriteSummary::default()
    };
    if let Some(memory) = memory {
        summary.memory_bytes = extents.iter().map(|e| e.length).sum();
        // Scan (helper thread): one DATA record per non-zero span (a chunk is at most
        // one record long), its head and CRC.
        let scan = |job: &Job, chunk: &[u8]| {
            let mut records = Vec::new();
            for PageRun { offset, len, .. } in page_runs(chunk).filter(|r| !r.zero) {
                let gpa = job.extent.gpa + job.offset + offset as u64;
                let head = record_head(1, gpa, len as u64);
                let mut crc = Crc64::new();
                crc.update(&head);
                crc.update(&chunk[offset..offset + len]);
                records.push((offset, len, head, crc.finish()));
            }
            records
        };
        // Write (this thread): the records, in order. Zero pages are not sent.
        let write = |_: &Job, chunk: &[u8], records: Vec<(usize, usize, [u8; 24], u64)>| {
            for (start, len, head, crc) in records {
                w.write_all(&head).map_err(io_err)?;
                w.write_all(&crc.to_le_bytes()).map_err(io_err)?;
                w.write_all(&chunk[start..start + len]).map_err(io_err)?;
                summary.runs += 1;
                summary.data_bytes += len as u64;
                summary.total_length += 32 + len as u64;
            }
            Ok(())
        };
        for_each_chunk(memory, &extents, scan, write)?;
    }
    let head = record_head(2, 0, summary.runs);
    w.write_all(&head).map_err(io_err)?;
    w.write_all(&crate::checksum::crc64(&head).to_le_bytes())
        .map_err(io_err)?;
    summary.total_length += 32;
    Ok(summary)
}

/// The first 24 bytes of a stream record.
pub(crate) fn record_head(tag: u32, gpa: u64, length: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&tag.to_le_bytes());
    h[8..16].copy_from_slice(&gpa.to_le_bytes());
    h[16..24].copy_from_slice(&length.to_le_bytes());
    h
}
