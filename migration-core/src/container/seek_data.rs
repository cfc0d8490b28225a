//! Finding the data of a sparse file: [`SeekData`], so a reader's cost follows the
//! bytes a file stores, not the guest memory it declares (`docs/format.md` §6).

use std::fs::File;
use std::io::{self, Cursor};

/// A seekable input that can say where its data is and where its holes are
/// (`lseek(SEEK_DATA)` / `SEEK_HOLE` for files). Holes read as zero; a reader skips
/// them instead of reading them.
pub trait SeekData {
    /// The first data segment at or after `offset` (absolute position in the input):
    /// `Some((start, end))` with `offset ≤ start < end`, or `None` if only holes (or
    /// the end) follow. An input without holes returns `(offset, its length)`.
    fn data_segment(&mut self, offset: u64) -> io::Result<Option<(u64, u64)>>;
}

impl SeekData for File {
    fn data_segment(&mut self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        (&*self).data_segment(offset)
    }
}

impl SeekData for &File {
    fn data_segment(&mut self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let start = match seek(&**self, SeekFrom::Data(offset)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let end = seek(&**self, SeekFrom::Hole(start))?;
        Ok((end > start).then_some((start, end)))
    }
}

impl<T: AsRef<[u8]>> SeekData for Cursor<T> {
    fn data_segment(&mut self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.get_ref().as_ref().len() as u64;
        Ok((offset < len).then_some((offset, len)))
    }
}

impl<T: SeekData + ?Sized> SeekData for &mut T {
    fn data_segment(&mut self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        (**self).data_segment(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_sparse_file_shows_its_data_and_skips_its_holes() {
        let mut f = tempfile_in_target();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.set_len(4 << 20).unwrap();
        let (start, end) = f.data_segment(0).unwrap().unwrap();
        // Filesystems without hole support report everything as data.
        assert!(start <= 1 << 20 && end >= (1 << 20) + 4096, "{start} {end}");
        assert!(f.data_segment(4 << 20).unwrap().is_none());
        let mut c = Cursor::new(vec![0u8; 10]);
        assert_eq!(c.data_segment(3).unwrap(), Some((3, 10)));
        assert_eq!(c.data_segment(10).unwrap(), None);
    }

    fn tempfile_in_target() -> File {
        let path = std::env::temp_dir().join(format!("seek-data-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
