//! Walking a file's data extents with `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`, so holes are
//! skipped without being read.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use rustix::fs::{SeekFrom, seek};
use rustix::io::Errno;

use super::CopyError;

/// The data extents of `file` below `len`, in order, as byte ranges.
///
/// Adjacent extents are reported merged, as the kernel does. Where the kernel cannot seek for
/// data (`EINVAL`/`EOPNOTSUPP`, which Linux only returns on very old kernels or unusual
/// filesystems), the rest of the file is one data extent: correct, only not sparse. The file's
/// offset is moved; callers use positional reads.
pub(super) fn data_extents<'a>(file: &'a File, path: &'a Path, len: u64) -> DataExtents<'a> {
    DataExtents {
        file,
        path,
        len,
        pos: 0,
    }
}

/// Total bytes in the data extents of `file` below `len`.
pub(super) fn data_bytes(file: &File, path: &Path, len: u64) -> Result<u64, CopyError> {
    data_extents(file, path, len).try_fold(0u64, |sum, extent| {
        extent.map(|range| sum + (range.end - range.start))
    })
}

/// Iterator returned by [`data_extents`].
pub(super) struct DataExtents<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
    pos: u64,
}

impl DataExtents<'_> {
    fn seek_error(&mut self, offset: u64, errno: Errno) -> Option<Result<Range<u64>, CopyError>> {
        self.pos = self.len;
        Some(Err(CopyError::Seek {
            path: self.path.to_path_buf(),
            offset,
            source: errno.into(),
        }))
    }
}

impl Iterator for DataExtents<'_> {
    type Item = Result<Range<u64>, CopyError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let start = match seek(self.file, SeekFrom::Data(self.pos)) {
            Ok(start) => start,
            // No data at or after `pos`: the rest of the file is a hole.
            Err(Errno::NXIO) => {
                self.pos = self.len;
                return None;
            }
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                let rest = self.pos..self.len;
                self.pos = self.len;
                return Some(Ok(rest));
            }
            Err(errno) => return self.seek_error(self.pos, errno),
        };
        if start >= self.len {
            self.pos = self.len;
            return None;
        }
        let end = match seek(self.file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(self.len),
            // The file shrank under us; the reads will report it.
            Err(Errno::NXIO) => self.len,
            Err(errno) => return self.seek_error(start, errno),
        };
        if end <= start {
            // Cannot happen on a sane filesystem; do not loop forever if it does.
            return self.seek_error(start, Errno::IO);
        }
        self.pos = end;
        Some(Ok(start..end))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn extents(file: &File, len: u64) -> Vec<Range<u64>> {
        data_extents(file, Path::new("test"), len)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    // These tests need a filesystem that reports holes (ext4, XFS, btrfs, tmpfs): the temporary
    // directory is on one on any Linux machine this runs on. Extents are block-aligned, so data
    // is written at block-aligned offsets and sizes.

    #[test]
    fn empty_and_all_hole_files_have_no_extents() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create_new(dir.path().join("f")).unwrap();
        assert_eq!(extents(&f, 0), Vec::<Range<u64>>::new());
        f.set_len(64 * MIB).unwrap();
        assert_eq!(extents(&f, 64 * MIB), Vec::<Range<u64>>::new());
        assert_eq!(data_bytes(&f, Path::new("f"), 64 * MIB).unwrap(), 0);
    }

    #[test]
    fn scattered_data_is_found_and_holes_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create_new(dir.path().join("f")).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.write_all_at(&[2; 8192], 10 * MIB).unwrap();
        f.write_all_at(&[3; 4096], 64 * MIB - 4096).unwrap();
        f.sync_all().unwrap();
        assert_eq!(
            extents(&f, 64 * MIB),
            vec![
                0..4096,
                10 * MIB..10 * MIB + 8192,
                64 * MIB - 4096..64 * MIB
            ]
        );
        assert_eq!(
            data_bytes(&f, Path::new("f"), 64 * MIB).unwrap(),
            4096 + 8192 + 4096
        );
    }

    #[test]
    fn extents_are_clipped_to_the_given_length() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create_new(dir.path().join("f")).unwrap();
        f.write_all_at(&[1; 8192], MIB).unwrap();
        assert_eq!(extents(&f, MIB + 4096), vec![MIB..MIB + 4096]);
        assert_eq!(extents(&f, MIB), Vec::<Range<u64>>::new());
    }

    #[test]
    fn a_fully_written_file_is_one_extent() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create_new(dir.path().join("f")).unwrap();
        f.write_all_at(&vec![5; 3 * MIB as usize], 0).unwrap();
        assert_eq!(extents(&f, 3 * MIB), vec![0..3 * MIB]);
    }
}
