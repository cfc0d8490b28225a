//! Reading, verifying and inspecting containers.

use std::io::{self, Read, Seek, SeekFrom};

use super::error::FormatError;
use super::extents::{check_run_table_len, decode_run_table, DataRun, Extent};
use super::header::{u32_at, u64_at, Form, Header, HEADER_LEN, MAGIC};
use super::limits::MAX_RECORD_LEN;
use super::metadata::{self, Metadata, NodeInfo, SectionInfo};
use crate::checksum::{crc64, CrcReader};
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
        let what = || format!("section {}:{}", s.path, s.id);
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
    let mut ei = 0usize;
    let mut cursor = extents.first().map_or(0, |e| e.gpa); // next unwritten gpa of extent ei
    let mut prev_end = 0u64;
    let mut count = 0u64;
    let mut data = 0u64;
    loop {
        let mut head = [0u8; 32];
        r.read_exact(&mut head)
            .map_err(|e| io(e, &|| format!("memory record {count}")))?;
        let tag = u32_at(&head, 0);
        let gpa = u64_at(&head, 8);
        let length = u64_at(&head, 16);
        let crc = u64_at(&head, 24);
        if u32_at(&head, 4) != 0 {
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
                break;
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
        if gpa < prev_end {
            return Err(FormatError::Overlap {
                what: format!("{} overlaps or precedes the previous record", what()),
            }
            .into());
        }
        while ei < extents.len() && extents[ei].gpa + extents[ei].length <= gpa {
            let e = extents[ei];
            zero(sink, opts, cursor, e.gpa + e.length - cursor)?;
            ei += 1;
            cursor = extents.get(ei).map_or(0, |e| e.gpa);
        }
        let end = gpa.checked_add(length).ok_or_else(|| {
            MigratableError::from(FormatError::malformed(format!(
                "{}: runs past the address space",
                what()
            )))
        })?;
        match extents.get(ei) {
            Some(e) if e.gpa <= gpa && end <= e.gpa + e.length => {}
            _ => {
                return Err(
                    FormatError::malformed(format!("{}: outside every extent", what())).into(),
                )
            }
        }
        zero(sink, opts, cursor, gpa - cursor)?;
        let computed = copy_checked(r, &head[..24], gpa, length, sink, &what)?;
        if computed != crc {
            return Err(FormatError::Checksum {
                what: what(),
                stored: crc,
                computed,
            }
            .into());
        }
        cursor = end;
        prev_end = end;
        count += 1;
        data += length;
    }
    while ei < extents.len() {
        let e = extents[ei];
        zero(sink, opts, cursor, e.gpa + e.length - cursor)?;
        ei += 1;
        cursor = extents.get(ei).map_or(0, |e| e.gpa);
    }
    Ok((count, data))
}

/// A container opened for reading: header, metadata and (file form) run table are
/// read and checked; payloads and memory are read on demand.
#[derive(Debug)]
pub struct ContainerReader<R> {
    r: R,
    base: u64,
    header: Header,
    md: Metadata,
    runs: Option<Vec<DataRun>>,
}

impl<R: Read + Seek> ContainerReader<R> {
    /// Opens the container that starts at `r`'s current position and ends at its end.
    /// Checks the header, the lengths against the limits and the file size, the
    /// metadata (checksum and structure) and, in the file form, the run table.
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
        let runs = match header.form {
            Form::Stream => None,
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

    /// File form: the data runs (for `mmap` restores); stream form: `None`.
    pub fn runs(&self) -> Option<&[DataRun]> {
        self.runs.as_deref()
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
        let mut snapshot = self.read_tree(true)?;
        self.memory(sink, options, true)?;
        snapshot.resolve_codecs(codecs);
        Ok(snapshot)
    }

    fn read_tree(&mut self, keep: bool) -> Result<Snapshot, MigratableError> {
        self.r
            .seek(SeekFrom::Start(self.base + self.header.payload_offset()))?;
        let payloads = read_payloads(&mut self.r, &self.md, keep)?;
        Ok(self.md.build(payloads))
    }

    fn memory(
        &mut self,
        sink: Option<&dyn MemorySink>,
        opts: &ReadOptions,
        restoring: bool,
    ) -> Result<(u64, u64), MigratableError> {
        let Some(runs) = &self.runs else {
            return read_records(&mut self.r, &self.md.extents, sink, opts);
        };
        if restoring && sink.is_none() {
            return Ok((0, 0));
        }
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

    /// Checks every checksum (payloads, memory runs) by streaming through the container,
    /// without restoring anything. The first mismatch is an error naming the section
    /// path or the memory run.
    pub fn verify(&mut self) -> Result<VerifyReport, MigratableError> {
        self.read_tree(false)?;
        let (runs, data_bytes) = self.memory(None, &ReadOptions::default(), false)?;
        Ok(VerifyReport {
            sections: self.md.sections.len() as u64,
            payload_bytes: self.header.payload_length,
            extents: self.md.extents.len() as u64,
            memory_bytes: self.md.extents.iter().map(|e| e.length).sum(),
            runs,
            data_bytes,
        })
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }
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
pub fn verify<R: Read + Seek>(r: R) -> Result<VerifyReport, MigratableError> {
    ContainerReader::open(r)?.verify()
}

/// The header, tree (with sizes) and extent table of a container.
pub fn inspect<R: Read + Seek>(r: R) -> Result<ContainerInfo, MigratableError> {
    Ok(ContainerReader::open(r)?.info())
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
    let payloads = read_payloads(r, &md, keep)?;
    let (runs, data_bytes) = read_records(r, &md.extents, sink, opts)?;
    let report = VerifyReport {
        sections: md.sections.len() as u64,
        payload_bytes: header.payload_length,
        extents: md.extents.len() as u64,
        memory_bytes: md.extents.iter().map(|e| e.length).sum(),
        runs,
        data_bytes,
    };
    Ok((md.build(payloads), report))
}
