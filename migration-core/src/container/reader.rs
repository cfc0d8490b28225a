//! Reading, verifying and inspecting containers.

use std::io::{self, Read, Seek, SeekFrom};

use super::error::FormatError;
use super::extents::{check_run_table_len, decode_run_table, DataRun, Extent};
use super::header::{u32_at, u64_at, Form, Header, HEADER_LEN, MAGIC};
use super::limits::MAX_RECORD_LEN;
use super::metadata::{self, node_path, Metadata, NodeInfo, SectionInfo};
use super::seek_data::SeekData;
use super::writer::record_head;
use crate::checksum::{crc64, Crc64, CrcReader};
use crate::codec::{CodecId, CodecRegistry};
use crate::error::MigratableError;
use crate::memory::{MemoryError, MemorySink, PAGE_SIZE};
use crate::snapshot::Snapshot;

/// How a reader restores memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Write zeros into the sink for guest pages the container does not store (zero
    /// pages). Turn off only when the sink's memory is known to be zero already (a
    /// freshly created guest): it saves touching every page.
    pub zero_holes: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self { zero_holes: true }
    }
}

/// Everything a container declares, without its payloads or memory: for tools.
#[derive(Clone, Debug)]
pub struct ContainerInfo {
    /// The header.
    pub header: Header,
    /// Tree nodes in storage order (depth first, ids ascending), with sizes.
    pub nodes: Vec<NodeInfo>,
    /// Sections in storage order.
    pub sections: Vec<SectionInfo>,
    /// Memory extents, sorted by guest address.
    pub extents: Vec<Extent>,
    /// File form: the non-zero runs of the extents. Stream form: `None`.
    pub runs: Option<Vec<DataRun>>,
}

impl ContainerInfo {
    /// The path of node `index` of [`nodes`](Self::nodes) (`vm/devices/serial0`).
    pub fn path(&self, index: usize) -> String {
        node_path(&self.nodes, index)
    }

    /// Guest memory bytes the extents declare.
    pub fn memory_bytes(&self) -> u64 {
        declared(&self.extents)
    }
}

fn declared(extents: &[Extent]) -> u64 {
    extents
        .iter()
        .fold(0u64, |sum, e| sum.saturating_add(e.length))
}

/// One DATA record of a stream-form container read from a seekable input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    gpa: u64,
    length: u64,
    crc: u64,
    /// Offset of its data from the container's start.
    data_offset: u64,
}

/// Checks stream records one after the other (`docs/format.md` §7): tags, alignment,
/// order, each inside an extent, END's count.
struct RecordCheck<'e> {
    extents: &'e [Extent],
    /// The extent the next record may start in (records are in address order).
    ei: usize,
    prev_end: u64,
    count: u64,
}

/// A record header, checked.
enum Step {
    Data { gpa: u64, length: u64, crc: u64 },
    End,
}

impl<'e> RecordCheck<'e> {
    fn new(extents: &'e [Extent]) -> Self {
        Self {
            extents,
            ei: 0,
            prev_end: 0,
            count: 0,
        }
    }

    fn next(&mut self, head: &[u8; 32]) -> Result<Step, MigratableError> {
        let count = self.count;
        let tag = u32_at(head, 0);
        let gpa = u64_at(head, 8);
        let length = u64_at(head, 16);
        let crc = u64_at(head, 24);
        if u32_at(head, 4) != 0 {
            return Err(
                FormatError::malformed(format!("record {count}: reserved is not zero")).into(),
            );
        }
        match tag {
            2 => {
                let computed = crc64(&head[..24]);
                if computed != crc {
                    return Err(FormatError::Checksum {
                        what: "END record".into(),
                        stored: crc,
                        computed,
                    }
                    .into());
                }
                if gpa != 0 || length != count {
                    return Err(FormatError::malformed(format!(
                        "END record counts {length} records at {gpa:#x}, {count} were sent"
                    ))
                    .into());
                }
                return Ok(Step::End);
            }
            1 => {}
            t => {
                return Err(
                    FormatError::malformed(format!("record {count}: unknown tag {t}")).into(),
                )
            }
        }
        let what = || format!("memory record {count} (gpa {gpa:#x}, {length:#x} bytes)");
        if length > MAX_RECORD_LEN {
            return Err(FormatError::limit("memory record length", length, MAX_RECORD_LEN).into());
        }
        if gpa % PAGE_SIZE != 0 || length % PAGE_SIZE != 0 || length == 0 {
            return Err(FormatError::malformed(format!("{}: empty or unaligned", what())).into());
        }
        if gpa < self.prev_end {
            return Err(FormatError::Overlap {
                what: format!("{} overlaps or precedes the previous record", what()),
            }
            .into());
        }
        let end = gpa.checked_add(length).ok_or_else(|| {
            MigratableError::from(FormatError::malformed(format!(
                "{}: runs past the address space",
                what()
            )))
        })?;
        while self
            .extents
            .get(self.ei)
            .is_some_and(|e| e.gpa + e.length <= gpa)
        {
            self.ei += 1;
        }
        match self.extents.get(self.ei) {
            Some(e) if e.gpa <= gpa && end <= e.gpa + e.length => {}
            _ => {
                return Err(
                    FormatError::malformed(format!("{}: outside every extent", what())).into(),
                )
            }
        }
        self.prev_end = end;
        self.count += 1;
        Ok(Step::Data { gpa, length, crc })
    }
}

/// The stream form has no file offsets (`docs/format.md` §4): every extent's is 0.
fn check_stream_extents(extents: &[Extent]) -> Result<(), MigratableError> {
    match extents.iter().position(|e| e.file_offset != 0) {
        Some(i) => Err(FormatError::malformed(format!(
            "stream form: extent {i} has file_offset {:#x}, must be 0",
            extents[i].file_offset
        ))
        .into()),
        None => Ok(()),
    }
}

/// Bytes `[from, from + len)` of `r` (absolute positions) into `crc`; holes are not
/// read, their zeros are added computed.
fn crc_range<R: Read + Seek + SeekData>(
    r: &mut R,
    from: u64,
    len: u64,
    crc: &mut Crc64,
    buf: &mut Vec<u8>,
    what: &dyn Fn() -> String,
) -> Result<(), MigratableError> {
    let end = from + len;
    let mut at = from;
    while at < end {
        let (start, stop) = match r.data_segment(at)? {
            Some((s, e)) if s < end => (s, e.min(end)),
            _ => (end, end),
        };
        crc.update_zeros(start - at);
        if start < stop {
            r.seek(SeekFrom::Start(start))?;
            read_chunks(r, stop - start, buf, what, |b| {
                crc.update(b);
                Ok(())
            })?;
        }
        at = stop;
    }
    Ok(())
}

/// Checks that bytes `[from, from + len)` of `r` (absolute positions) read as zero;
/// holes are skipped, not read.
fn check_zero<R: Read + Seek + SeekData>(
    r: &mut R,
    base: u64,
    from: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<(), MigratableError> {
    let end = from + len;
    let mut at = from;
    while at < end {
        let Some((start, stop)) = r.data_segment(at)?.filter(|&(s, _)| s < end) else {
            return Ok(());
        };
        let stop = stop.min(end);
        r.seek(SeekFrom::Start(start))?;
        let mut pos = start;
        read_chunks(r, stop - start, buf, &|| "memory".into(), |b| {
            if let Some(i) = b.iter().position(|&x| x != 0) {
                return Err(FormatError::malformed(format!(
                    "non-zero byte at offset {:#x}, inside an extent but outside every data run",
                    pos - base + i as u64
                ))
                .into());
            }
            pos += b.len() as u64;
            Ok(())
        })?;
        at = stop;
    }
    Ok(())
}

/// Reads `len` bytes of `r` through `buf` (at most 1 MiB), handing each piece to `f`.
fn read_chunks<R: Read>(
    r: &mut R,
    len: u64,
    buf: &mut Vec<u8>,
    what: &dyn Fn() -> String,
    mut f: impl FnMut(&[u8]) -> Result<(), MigratableError>,
) -> Result<(), MigratableError> {
    let mut left = len;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        buf.resize(n, 0);
        r.read_exact(&mut buf[..n]).map_err(|e| io(e, what))?;
        f(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The result of a successful [`verify`]: every checksum matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Sections checked.
    pub sections: u64,
    /// Payload bytes checked.
    pub payload_bytes: u64,
    /// Memory extents.
    pub extents: u64,
    /// Guest bytes the extents cover.
    pub memory_bytes: u64,
    /// Runs or DATA records checked.
    pub runs: u64,
    /// Non-zero memory bytes checked.
    pub data_bytes: u64,
}

fn truncated(what: impl Into<String>) -> MigratableError {
    FormatError::truncated(what).into()
}

/// Maps an I/O error, treating an early end as truncation of `what`.
fn io(e: io::Error, what: &dyn Fn() -> String) -> MigratableError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        truncated(what())
    } else {
        MigratableError::Io(e)
    }
}

fn mem(e: MemoryError, what: &dyn Fn() -> String) -> MigratableError {
    match e {
        MemoryError::Io(e) => io(e, what),
        other => MigratableError::Memory(other),
    }
}

/// Reads exactly `len` bytes, growing the buffer only as bytes arrive.
fn read_bounded<R: Read>(
    r: &mut R,
    len: u64,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>, MigratableError> {
    let mut v = Vec::with_capacity(len.min(1 << 20) as usize);
    r.take(len).read_to_end(&mut v).map_err(|e| io(e, what))?;
    if (v.len() as u64) < len {
        return Err(truncated(what()));
    }
    Ok(v)
}

fn read_header<R: Read>(r: &mut R) -> Result<Header, MigratableError> {
    let mut b = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut b[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MigratableError::Io(e)),
        }
    }
    if got >= 8 && b[..8] != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[..8]);
        return Err(FormatError::BadMagic { found }.into());
    }
    if got < HEADER_LEN {
        return Err(truncated("header"));
    }
    Ok(Header::decode(&b)?)
}

fn read_metadata<R: Read>(r: &mut R, h: &Header) -> Result<Metadata, MigratableError> {
    let block = read_bounded(r, h.metadata_length, &|| "metadata".into())?;
    let body = block.len() - 8;
    let stored = u64_at(&block, body);
    let computed = crc64(&block[..body]);
    if stored != computed {
        return Err(FormatError::Checksum {
            what: "metadata".into(),
            stored,
            computed,
        }
        .into());
    }
    Ok(metadata::decode(
        &block,
        h.payload_offset(),
        h.payload_length,
    )?)
}

fn read_payloads<R: Read>(
    r: &mut R,
    md: &Metadata,
    keep: bool,
) -> Result<Vec<Vec<u8>>, MigratableError> {
    let mut out = Vec::new();
    for s in &md.sections {
        let what = || format!("section {}:{}", node_path(&md.nodes, s.node), s.id);
        let payload = read_bounded(r, s.length, &what)?;
        let computed = crc64(&payload);
        if computed != s.crc {
            return Err(FormatError::Checksum {
                what: what(),
                stored: s.crc,
                computed,
            }
            .into());
        }
        if keep {
            out.push(payload);
        }
    }
    Ok(out)
}

/// Streams `len` bytes of `r` into `sink` at `gpa` (or nowhere) and returns their CRC,
/// seeded with `seed`.
fn copy_checked<R: Read>(
    r: &mut R,
    seed: &[u8],
    gpa: u64,
    len: u64,
    sink: Option<&dyn MemorySink>,
    what: &dyn Fn() -> String,
) -> Result<u64, MigratableError> {
    let mut cr = CrcReader::new(r.take(len));
    cr.crc.update(seed);
    match sink {
        Some(sink) => sink
            .read_memory_from(gpa, len, &mut cr)
            .map_err(|e| mem(e, what))?,
        None => {
            let mut buf = vec![0u8; len.min(1 << 20) as usize];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                cr.read_exact(&mut buf[..n]).map_err(|e| io(e, what))?;
                left -= n as u64;
            }
        }
    }
    if cr.count < len {
        return Err(truncated(what()));
    }
    Ok(cr.crc.finish())
}

fn zero(
    sink: Option<&dyn MemorySink>,
    opts: &ReadOptions,
    gpa: u64,
    len: u64,
) -> Result<(), MigratableError> {
    match sink {
        Some(s) if opts.zero_holes && len > 0 => {
            s.zero_memory(gpa, len).map_err(MigratableError::Memory)
        }
        _ => Ok(()),
    }
}

/// Reads stream-form memory records up to END. Returns (records, data bytes).
fn read_records<R: Read>(
    r: &mut R,
    extents: &[Extent],
    sink: Option<&dyn MemorySink>,
    opts: &ReadOptions,
) -> Result<(u64, u64), MigratableError> {
    let mut check = RecordCheck::new(extents);
    let mut zeros = ZeroFill::new(extents, sink, opts);
    let mut data = 0u64;
    loop {
        let count = check.count;
        let mut head = [0u8; 32];
        r.read_exact(&mut head)
            .map_err(|e| io(e, &|| format!("memory record {count}")))?;
        let Step::Data { gpa, length, crc } = check.next(&head)? else {
            break;
        };
        let what = || format!("memory record {count} (gpa {gpa:#x}, {length:#x} bytes)");
        zeros.up_to(gpa)?;
        let computed = copy_checked(r, &head[..24], gpa, length, sink, &what)?;
        if computed != crc {
            return Err(FormatError::Checksum {
                what: what(),
                stored: crc,
                computed,
            }
            .into());
        }
        zeros.skip_to(gpa + length);
        data += length;
    }
    zeros.up_to(u64::MAX)?;
    Ok((check.count, data))
}

/// Zero-fills the extents' bytes no record covers, in address order.
struct ZeroFill<'a> {
    extents: &'a [Extent],
    sink: Option<&'a dyn MemorySink>,
    opts: &'a ReadOptions,
    /// Next extent, and the first guest address of it not yet written.
    ei: usize,
    cursor: u64,
}

impl<'a> ZeroFill<'a> {
    fn new(extents: &'a [Extent], sink: Option<&'a dyn MemorySink>, opts: &'a ReadOptions) -> Self {
        Self {
            extents,
            sink,
            opts,
            ei: 0,
            cursor: extents.first().map_or(0, |e| e.gpa),
        }
    }

    /// Zeros every unwritten byte below `gpa`.
    fn up_to(&mut self, gpa: u64) -> Result<(), MigratableError> {
        while let Some(e) = self.extents.get(self.ei) {
            let end = e.gpa + e.length;
            let stop = end.min(gpa);
            if self.cursor < stop {
                zero(self.sink, self.opts, self.cursor, stop - self.cursor)?;
                self.cursor = stop;
            }
            if gpa < end {
                return Ok(());
            }
            self.ei += 1;
            self.cursor = self.extents.get(self.ei).map_or(0, |e| e.gpa);
        }
        Ok(())
    }

    /// Marks everything below `gpa` written.
    fn skip_to(&mut self, gpa: u64) {
        self.cursor = self.cursor.max(gpa);
    }
}

/// A container opened for reading: header, metadata and (file form) run table or
/// (stream form) the record headers are read and checked; payloads and memory are
/// read on demand.
#[derive(Debug)]
pub struct ContainerReader<R> {
    r: R,
    base: u64,
    header: Header,
    md: Metadata,
    runs: Option<Vec<DataRun>>,
    /// Stream form: the DATA records, found by walking their headers.
    records: Vec<Record>,
}

impl<R: Read + Seek> ContainerReader<R> {
    /// Opens the container that starts at `r`'s current position and ends at its end.
    /// Checks the header, the lengths against the limits and the file size, the
    /// metadata (checksum and structure) and, in the file form, the padding and the
    /// run table; in the stream form, every record header, and that the container
    /// ends right after its END record (no bytes, no second container after it).
    /// The cost is bounded by the bytes the input holds, not by the guest memory its
    /// extents declare.
    pub fn open(mut r: R) -> Result<Self, MigratableError> {
        let base = r.stream_position()?;
        let file_len = r.seek(SeekFrom::End(0))?.saturating_sub(base);
        r.seek(SeekFrom::Start(base))?;
        let header = read_header(&mut r)?;
        let oof = |what: &str, offset: u64, length: u64| FormatError::OutOfFile {
            what: what.into(),
            offset,
            length,
            file_len,
        };
        match header.form {
            Form::File => {
                if file_len < header.total_length {
                    return Err(truncated(format!(
                        "file ({file_len} bytes, header says {})",
                        header.total_length
                    )));
                }
                if file_len > header.total_length {
                    return Err(FormatError::malformed(format!(
                        "file has {} bytes after the container",
                        file_len - header.total_length
                    ))
                    .into());
                }
                check_run_table_len(header.run_table_length)?;
                let ok = header.run_table_offset % 8 == 0
                    && header.run_table_offset >= header.payload_end()
                    && header.run_table_offset.checked_add(header.run_table_length)
                        == Some(header.total_length);
                if !ok {
                    return Err(oof(
                        "run table",
                        header.run_table_offset,
                        header.run_table_length,
                    )
                    .into());
                }
            }
            Form::Stream => {
                if header.payload_end() > file_len {
                    return Err(truncated("payload area"));
                }
            }
        }
        let md = read_metadata(&mut r, &header)?;
        let mut records = Vec::new();
        let runs = match header.form {
            Form::Stream => {
                check_stream_extents(&md.extents)?;
                records = walk_records(&mut r, base, header.payload_end(), file_len, &md)?;
                None
            }
            Form::File => {
                // The layout is fixed (format.md §6): first extent at the payload end
                // rounded up to a page, extents back to back, run table at the data end
                // rounded up to 8. Padding is zero.
                let mut expected = header.payload_end().div_ceil(PAGE_SIZE) * PAGE_SIZE;
                let mut data_end = header.payload_end();
                for (i, e) in md.extents.iter().enumerate() {
                    let end = e.file_offset.checked_add(e.length);
                    if e.file_offset != expected
                        || end.is_none_or(|end| end > header.run_table_offset)
                    {
                        return Err(oof(
                            &format!("extent {i} (gpa {:#x})", e.gpa),
                            e.file_offset,
                            e.length,
                        )
                        .into());
                    }
                    expected = e.file_offset + e.length;
                    data_end = expected;
                }
                if header.run_table_offset != data_end.div_ceil(8) * 8 {
                    return Err(FormatError::malformed(format!(
                        "run table at {:#x}, expected {:#x}",
                        header.run_table_offset,
                        data_end.div_ceil(8) * 8
                    ))
                    .into());
                }
                let first = md
                    .extents
                    .first()
                    .map_or(header.run_table_offset, |e| e.file_offset);
                let gaps = [
                    (header.payload_end(), first),
                    (data_end, header.run_table_offset),
                ];
                for (from, to) in gaps {
                    if from < to {
                        r.seek(SeekFrom::Start(base + from))?;
                        let pad = read_bounded(&mut r, to - from, &|| "padding".into())?;
                        if pad.iter().any(|&b| b != 0) {
                            return Err(FormatError::malformed(format!(
                                "padding at [{from:#x}, {to:#x}) is not zero"
                            ))
                            .into());
                        }
                    }
                }
                r.seek(SeekFrom::Start(base + header.run_table_offset))?;
                let table = read_bounded(&mut r, header.run_table_length, &|| "run table".into())?;
                Some(decode_run_table(&table, &md.extents)?)
            }
        };
        Ok(Self {
            r,
            base,
            header,
            md,
            runs,
            records,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The memory extents.
    pub fn extents(&self) -> &[Extent] {
        &self.md.extents
    }

    /// Guest memory bytes the extents declare (zero pages included).
    pub fn memory_bytes(&self) -> u64 {
        declared(&self.md.extents)
    }

    /// Refuses a container declaring more than `max` bytes of guest memory
    /// ([`FormatError::LimitExceeded`]): a caller sets what it is willing to restore,
    /// before anything is read or allocated for it.
    pub fn check_memory_limit(&self, max: u64) -> Result<(), MigratableError> {
        let declared = self.memory_bytes();
        if declared > max {
            return Err(FormatError::limit("declared guest memory", declared, max).into());
        }
        Ok(())
    }

    /// File form: the data runs (for `mmap` restores); stream form: `None`.
    pub fn runs(&self) -> Option<&[DataRun]> {
        self.runs.as_deref()
    }

    /// The ranges of guest memory the container stores bytes for (file form: the data
    /// runs; stream form: the DATA records), in address order. Every other byte of an
    /// extent is zero.
    pub fn stored_ranges(&self) -> Vec<crate::memory::MemoryRange> {
        use crate::memory::MemoryRange;
        match &self.runs {
            Some(runs) => runs
                .iter()
                .map(|r| MemoryRange::new(r.gpa, r.length))
                .collect(),
            None => self
                .records
                .iter()
                .map(|r| MemoryRange::new(r.gpa, r.length))
                .collect(),
        }
    }

    /// Where the stored bytes at guest address `gpa` are, relative to the container's
    /// start, and how many follow contiguously: `None` if `gpa` is zero by
    /// definition (outside every run or record, or outside every extent).
    /// File form: inside an extent, every byte has a place (holes read as zero).
    pub fn locate(&self, gpa: u64) -> Option<(u64, u64)> {
        match &self.runs {
            Some(_) => {
                let i = self.md.extents.partition_point(|e| e.gpa + e.length <= gpa);
                let e = self.md.extents.get(i).filter(|e| e.gpa <= gpa)?;
                Some((e.file_offset + (gpa - e.gpa), e.gpa + e.length - gpa))
            }
            None => {
                let i = self.records.partition_point(|r| r.gpa + r.length <= gpa);
                let r = self.records.get(i).filter(|r| r.gpa <= gpa)?;
                Some((r.data_offset + (gpa - r.gpa), r.gpa + r.length - gpa))
            }
        }
    }

    /// Everything the container declares.
    pub fn info(&self) -> ContainerInfo {
        ContainerInfo {
            header: self.header.clone(),
            nodes: self.md.nodes.clone(),
            sections: self.md.sections.clone(),
            extents: self.md.extents.clone(),
            runs: self.runs.clone(),
        }
    }

    /// The codecs the container's sections name (from the metadata: no payload is
    /// read).
    pub fn required_codecs(&self) -> std::collections::BTreeSet<CodecId> {
        self.md.sections.iter().map(|s| s.codec).collect()
    }

    /// Checks that `codecs` has every codec the sections name, before payloads or
    /// memory are read: [`MigratableError::MissingCodecs`] otherwise. A restore
    /// calls it first; tools that only look (inspect, verify) need not.
    pub fn check_codecs(&self, codecs: &CodecRegistry) -> Result<(), MigratableError> {
        MigratableError::check_codecs(self.required_codecs(), codecs)
    }

    /// Reads the snapshot tree (codecs resolved through `codecs`) and, if `sink` is
    /// given, restores the memory extents into it.
    pub fn read_snapshot(
        &mut self,
        codecs: &CodecRegistry,
        sink: Option<&dyn MemorySink>,
        options: &ReadOptions,
    ) -> Result<Snapshot, MigratableError> {
        let mut snapshot = self.read_tree()?;
        if sink.is_some() {
            self.memory(sink, options)?;
        }
        snapshot.resolve_codecs(codecs);
        Ok(snapshot)
    }

    fn read_tree(&mut self) -> Result<Snapshot, MigratableError> {
        self.r
            .seek(SeekFrom::Start(self.base + self.header.payload_offset()))?;
        let payloads = read_payloads(&mut self.r, &self.md, true)?;
        Ok(self.md.build(payloads))
    }

    /// Restores memory into `sink`, right after [`read_tree`](Self::read_tree).
    fn memory(
        &mut self,
        sink: Option<&dyn MemorySink>,
        opts: &ReadOptions,
    ) -> Result<(u64, u64), MigratableError> {
        let Some(runs) = &self.runs else {
            return read_records(&mut self.r, &self.md.extents, sink, opts);
        };
        let mut ri = 0;
        let mut data = 0;
        for (ei, e) in self.md.extents.iter().enumerate() {
            let mut cursor = 0;
            while let Some(run) = runs.get(ri).filter(|r| r.extent as usize == ei) {
                zero(sink, opts, e.gpa + cursor, run.offset - cursor)?;
                self.r.seek(SeekFrom::Start(self.base + run.file_offset))?;
                let what = || format!("run {ri} (gpa {:#x}, {:#x} bytes)", run.gpa, run.length);
                let computed = copy_checked(&mut self.r, &[], run.gpa, run.length, sink, &what)?;
                if computed != run.crc {
                    return Err(FormatError::Checksum {
                        what: what(),
                        stored: run.crc,
                        computed,
                    }
                    .into());
                }
                cursor = run.offset + run.length;
                data += run.length;
                ri += 1;
            }
            zero(sink, opts, e.gpa + cursor, e.length - cursor)?;
        }
        Ok((runs.len() as u64, data))
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Where the container starts in the underlying reader.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// The underlying reader, to read at offsets from [`locate`](Self::locate).
    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

impl<R: Read + Seek + SeekData> ContainerReader<R> {
    /// Checks every checksum (payloads, memory runs or records) and, in the file form,
    /// that every byte of an extent outside its data runs reads as zero (so an `mmap`
    /// restore sees what a copying restore sees), without restoring anything. Holes
    /// are skipped ([`SeekData`]): the cost follows the bytes stored, not the memory
    /// declared. The first mismatch is an error naming the section path or the
    /// memory run.
    ///
    /// `verify` is the validation every tool runs: what it refuses, `inspect`,
    /// `convert`, `diff` and `merge` refuse too.
    pub fn verify(&mut self) -> Result<VerifyReport, MigratableError> {
        // The payloads' checksums, without building the tree.
        self.r
            .seek(SeekFrom::Start(self.base + self.header.payload_offset()))?;
        read_payloads(&mut self.r, &self.md, false)?;
        let mut buf = Vec::new();
        let (runs, data_bytes) = match &self.runs {
            Some(runs) => {
                let mut data = 0;
                let mut ri = 0;
                for (ei, e) in self.md.extents.iter().enumerate() {
                    let mut cursor = 0;
                    while let Some(run) = runs.get(ri).filter(|r| r.extent as usize == ei) {
                        let at = self.base + e.file_offset;
                        check_zero(
                            &mut self.r,
                            self.base,
                            at + cursor,
                            run.offset - cursor,
                            &mut buf,
                        )?;
                        let what =
                            || format!("run {ri} (gpa {:#x}, {:#x} bytes)", run.gpa, run.length);
                        let mut crc = Crc64::new();
                        crc_range(
                            &mut self.r,
                            self.base + run.file_offset,
                            run.length,
                            &mut crc,
                            &mut buf,
                            &what,
                        )?;
                        if crc.finish() != run.crc {
                            return Err(FormatError::Checksum {
                                what: what(),
                                stored: run.crc,
                                computed: crc.finish(),
                            }
                            .into());
                        }
                        cursor = run.offset + run.length;
                        data += run.length;
                        ri += 1;
                    }
                    let at = self.base + e.file_offset + cursor;
                    check_zero(&mut self.r, self.base, at, e.length - cursor, &mut buf)?;
                }
                (runs.len() as u64, data)
            }
            None => {
                let mut data = 0;
                for (i, rec) in self.records.iter().enumerate() {
                    let what = || {
                        format!(
                            "memory record {i} (gpa {:#x}, {:#x} bytes)",
                            rec.gpa, rec.length
                        )
                    };
                    let mut crc = Crc64::new();
                    crc.update(&record_head(1, rec.gpa, rec.length));
                    crc_range(
                        &mut self.r,
                        self.base + rec.data_offset,
                        rec.length,
                        &mut crc,
                        &mut buf,
                        &what,
                    )?;
                    if crc.finish() != rec.crc {
                        return Err(FormatError::Checksum {
                            what: what(),
                            stored: rec.crc,
                            computed: crc.finish(),
                        }
                        .into());
                    }
                    data += rec.length;
                }
                (self.records.len() as u64, data)
            }
        };
        Ok(VerifyReport {
            sections: self.md.sections.len() as u64,
            payload_bytes: self.header.payload_length,
            extents: self.md.extents.len() as u64,
            memory_bytes: self.memory_bytes(),
            runs,
            data_bytes,
        })
    }
}

/// Walks the DATA record headers of a stream-form container on a seekable input,
/// from `at` (relative to `base`), seeking over their data: checks each header
/// (`docs/format.md` §7) and that the container ends right after END.
fn walk_records<R: Read + Seek>(
    r: &mut R,
    base: u64,
    mut at: u64,
    file_len: u64,
    md: &Metadata,
) -> Result<Vec<Record>, MigratableError> {
    let mut check = RecordCheck::new(&md.extents);
    let mut records = Vec::new();
    loop {
        let count = check.count;
        if file_len.saturating_sub(at) < 32 {
            return Err(truncated(format!("memory record {count}")));
        }
        r.seek(SeekFrom::Start(base + at))?;
        let mut head = [0u8; 32];
        r.read_exact(&mut head)
            .map_err(|e| io(e, &|| format!("memory record {count}")))?;
        at += 32;
        match check.next(&head)? {
            Step::End => break,
            Step::Data { gpa, length, crc } => {
                if file_len - at < length {
                    return Err(truncated(format!(
                        "memory record {count} (gpa {gpa:#x}, {length:#x} bytes)"
                    )));
                }
                records.push(Record {
                    gpa,
                    length,
                    crc,
                    data_offset: at,
                });
                at += length;
            }
        }
    }
    if at != file_len {
        return Err(FormatError::malformed(format!(
            "{} bytes after the END record (a stream-form container ends there)",
            file_len - at
        ))
        .into());
    }
    Ok(records)
}

/// Reads a container of either form from a seekable reader: the snapshot with codecs
/// resolved, and memory into `sink` if given (zero pages zeroed).
pub fn read_snapshot<R: Read + Seek>(
    r: R,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
) -> Result<Snapshot, MigratableError> {
    ContainerReader::open(r)?.read_snapshot(codecs, sink, &ReadOptions::default())
}

/// Verifies every checksum of a container of either form. See [`ContainerReader::verify`].
pub fn verify<R: Read + Seek + SeekData>(r: R) -> Result<VerifyReport, MigratableError> {
    ContainerReader::open(r)?.verify()
}

/// The header, tree (with sizes) and extent table of a container, after the checks
/// of [`verify`] (a container `verify` refuses is refused here too).
pub fn inspect<R: Read + Seek + SeekData>(r: R) -> Result<ContainerInfo, MigratableError> {
    let mut reader = ContainerReader::open(r)?;
    reader.verify()?;
    Ok(reader.info())
}

/// Reads a **stream-form** container from `r` (a socket or pipe), up to and including
/// its END record: the snapshot with codecs resolved, and memory into `sink` if given.
/// Bytes after END are not read. A file-form container is rejected (it needs seeking).
pub fn read_snapshot_stream<R: Read>(
    r: &mut R,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
    options: &ReadOptions,
) -> Result<Snapshot, MigratableError> {
    let (snapshot, _) = stream(r, sink, options, true)?;
    let mut snapshot = snapshot;
    snapshot.resolve_codecs(codecs);
    Ok(snapshot)
}

/// Verifies a **stream-form** container read from `r`, up to its END record.
pub fn verify_stream<R: Read>(r: &mut R) -> Result<VerifyReport, MigratableError> {
    stream(r, None, &ReadOptions::default(), false).map(|(_, rep)| rep)
}

fn stream<R: Read>(
    r: &mut R,
    sink: Option<&dyn MemorySink>,
    opts: &ReadOptions,
    keep: bool,
) -> Result<(Snapshot, VerifyReport), MigratableError> {
    let header = read_header(r)?;
    if header.form != Form::Stream {
        return Err(
            FormatError::malformed("file-form container on a stream (it needs seeking)").into(),
        );
    }
    let md = read_metadata(r, &header)?;
    check_stream_extents(&md.extents)?;
    let payloads = read_payloads(r, &md, keep)?;
    let (runs, data_bytes) = read_records(r, &md.extents, sink, opts)?;
    let report = VerifyReport {
        sections: md.sections.len() as u64,
        payload_bytes: header.payload_length,
        extents: md.extents.len() as u64,
        memory_bytes: declared(&md.extents),
        runs,
        data_bytes,
    };
    Ok((md.build(payloads), report))
}
