//! The disk tier's block format (`KLC2`), for objects too large for memory: written
//! as their body streams in, read back by positional reads of one block at a time, each
//! block checked against its own checksum before a byte of it is served.
//!
//! File layout, integers little-endian:
//!
//! ```text
//! magic     b"KLC2"
//! meta_len  u32            (≤ 1 MiB)
//! meta      as in KLC1 (key, status, times, header fields, Vary values)
//! body_len  u64
//! head_sum  u64            xxh3-64 of everything above
//! body      [body_len]
//! sums      u64 per block of BLOCK bytes of the body (the last one may be shorter):
//!           xxh3-64 of the block
//! ```
//!
//! `body_len` and `head_sum` are written last, when the body's end is known; until
//! then they are zero, which no complete file has (the head sum of a real head is
//! checked), so a file cut short by a crash is refused at open. The checksums detect
//! corruption (a torn or damaged file), they do not authenticate: whoever can write the
//! cache directory can write any response. xxh3 (`xxhash-rust`) checks a block at
//! memory speed, where SHA-256 would cost more CPU than serving it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::histogram::Histogram;
use xxhash_rust::xxh3::xxh3_64;

use super::format::{decode_meta, eof_truncated, FormatError, Meta, FILE_MODE, MAX_META};

/// Magic of the block format.
pub(crate) const MAGIC: &[u8; 4] = b"KLC2";
/// Bytes of body per checksummed block: the unit of every read.
pub(crate) const BLOCK: u64 = 1 << 20;
/// `magic` + `meta_len` + `body_len` + `head_sum`.
const HEAD_FIXED: u64 = 4 + 4 + 8 + 8;

/// Blocks of a body of `body_len` bytes.
fn blocks(body_len: u64) -> u64 {
    body_len.div_ceil(BLOCK)
}

/// Size of a file whose metadata takes `meta_len` bytes and body `body_len`.
pub(crate) fn file_size(meta_len: u64, body_len: u64) -> Option<u64> {
    (HEAD_FIXED + meta_len)
        .checked_add(body_len)?
        .checked_add(blocks(body_len).checked_mul(8)?)
}

/// Writes one `KLC2` file, block by block (blocking I/O: run it off the async
/// runtime). The file may be read by [`read_at`] up to [`BlockWriter::readable`]
/// while it is written.
#[derive(Debug)]
pub(crate) struct BlockWriter {
    file: Arc<File>,
    /// `magic`, `meta_len` and `meta`: the part of the head known from the start.
    head: Vec<u8>,
    /// Body bytes on disk (whole blocks).
    written: u64,
    /// The block being filled (less than [`BLOCK`] bytes).
    pending: Vec<u8>,
    sums: Vec<u64>,
}

impl BlockWriter {
    /// Creates `path` (which must not exist; mode 0600) and writes the head with
    /// `meta`.
    pub(crate) fn create(path: &Path, meta: &[u8]) -> io::Result<BlockWriter> {
        if meta.len() > MAX_META {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "metadata too large",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)?;
        let mut head = Vec::with_capacity(HEAD_FIXED as usize + meta.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_le_bytes());
        head.extend_from_slice(meta);
        let mut placeholder = head.clone();
        placeholder.extend_from_slice(&[0u8; 16]);
        file.write_all_at(&placeholder, 0)?;
        Ok(BlockWriter {
            file: Arc::new(file),
            head,
            written: 0,
            pending: Vec::with_capacity(BLOCK as usize),
            sums: Vec::new(),
        })
    }

    /// The file, for readers of the growing body.
    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Offset of the body in the file.
    pub(crate) fn body_start(&self) -> u64 {
        self.head.len() as u64 + 16
    }

    /// Body bytes appended so far.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.written + self.pending.len() as u64
    }

    /// Body bytes on disk, readable by others.
    pub(crate) fn readable(&self) -> u64 {
        self.written
    }

    /// Appends body bytes, writing each block as it fills.
    pub(crate) fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = BLOCK as usize - self.pending.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.pending.extend_from_slice(now);
            data = rest;
            if self.pending.len() == BLOCK as usize {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.pending, self.body_start() + self.written)?;
        self.sums.push(xxh3_64(&self.pending));
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes the last block, the checksum table, then the body length and head
    /// sum. Returns the body length and the file size.
    pub(crate) fn finish(mut self) -> io::Result<(u64, u64)> {
        self.flush_block()?;
        let body_len = self.written;
        let table: Vec<u8> = self.sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.file
            .write_all_at(&table, self.body_start() + body_len)?;
        let mut tail = body_len.to_le_bytes().to_vec();
        let mut head = std::mem::take(&mut self.head);
        head.extend_from_slice(&tail);
        tail.extend_from_slice(&xxh3_64(&head).to_le_bytes());
        self.file.write_all_at(&tail, head.len() as u64 - 8)?;
        Ok((
            body_len,
            head.len() as u64 + 8 + body_len + table.len() as u64,
        ))
    }
}

/// Reads `len` bytes at `offset` of `file` (blocking).
pub(crate) fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(Bytes::from(buf))
}

/// Called when a block of a stored file turns out corrupt: drops the entry.
pub(crate) type OnCorrupt = Box<dyn Fn() + Send + Sync>;

/// A committed `KLC2` file opened for reading: its body is read block by block.
pub(crate) struct BlockFile {
    file: File,
    body_start: u64,
    body_len: u64,
    sums: Box<[u64]>,
    on_corrupt: Option<OnCorrupt>,
    timer: Option<Histogram>,
}

impl std::fmt::Debug for BlockFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockFile")
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

impl BlockFile {
    /// Reads and checks the head and the checksum table of `file` (of `size` bytes),
    /// which starts with [`MAGIC`]. Blocking.
    pub(crate) fn open(file: File, size: u64) -> Result<(Meta, BlockFile), FormatError> {
        let (meta, meta_len, body_len) = read_head(&file, size)?;
        let body_start = HEAD_FIXED + meta_len;
        let n = usize::try_from(blocks(body_len)).map_err(|_| FormatError::Bound("blocks"))?;
        let table = read_at(&file, body_start + body_len, n * 8).map_err(eof_truncated)?;
        let sums = table
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let blocks = BlockFile {
            file,
            body_start,
            body_len,
            sums,
            on_corrupt: None,
            timer: None,
        };
        Ok((meta, blocks))
    }

    /// Sets what a corrupt block does (the disk tier drops its entry).
    pub(crate) fn on_corrupt(&mut self, f: OnCorrupt) {
        self.on_corrupt = Some(f);
    }

    /// Times each block read (with its check) in `h`.
    pub(crate) fn time_reads(&mut self, h: Histogram) {
        self.timer = Some(h);
    }

    /// Length of the body.
    pub(crate) fn len(&self) -> u64 {
        self.body_len
    }

    /// Reads and checks block `i` (blocking).
    pub(crate) fn block(&self, i: u64) -> Result<Bytes, FormatError> {
        let started = std::time::Instant::now();
        let start = i * BLOCK;
        let len = self.body_len.saturating_sub(start).min(BLOCK);
        let expected = usize::try_from(i)
            .ok()
            .and_then(|i| self.sums.get(i))
            .ok_or(FormatError::Bound("block index"))?;
        let data = read_at(
            &self.file,
            self.body_start + start,
            usize::try_from(len).unwrap_or(0),
        )
        .map_err(eof_truncated)?;
        if xxh3_64(&data) != *expected {
            if let Some(f) = &self.on_corrupt {
                f();
            }
            return Err(FormatError::Checksum);
        }
        if let Some(h) = &self.timer {
            h.observe(started.elapsed().as_secs_f64());
        }
        Ok(data)
    }

    /// The body bytes `start..end` that lie in the block holding `start` (blocking):
    /// reads and checks that whole block.
    pub(crate) fn read_from(&self, start: u64, end: u64) -> Result<Bytes, FormatError> {
        let i = start / BLOCK;
        let block = self.block(i)?;
        let from = usize::try_from(start - i * BLOCK).unwrap_or(0);
        let to = usize::try_from(end.min((i + 1) * BLOCK) - i * BLOCK).unwrap_or(0);
        if from > to || to > block.len() {
            return Err(FormatError::Truncated);
        }
        Ok(block.slice(from..to))
    }

    /// The whole body, checked (blocking).
    #[cfg(test)]
    fn read_all(&self) -> Result<Bytes, FormatError> {
        let mut all = Vec::with_capacity(usize::try_from(self.body_len).unwrap_or(0));
        for i in 0..blocks(self.body_len) {
            all.extend_from_slice(&self.block(i)?);
        }
        Ok(Bytes::from(all))
    }
}

/// Reads the head of a `KLC2` file of `size` bytes: metadata, its length and the
/// body length, after checking the head sum and that the size is what they declare.
pub(crate) fn read_head(file: &File, size: u64) -> Result<(Meta, u64, u64), FormatError> {
    let fixed = read_at(file, 0, 8).map_err(eof_truncated)?;
    if &fixed[..4] != MAGIC {
        return Err(FormatError::Magic);
    }
    let meta_len = u64::from(u32::from_le_bytes(
        fixed[4..8].try_into().unwrap_or_default(),
    ));
    if meta_len > MAX_META as u64 {
        return Err(FormatError::Bound("metadata size"));
    }
    if HEAD_FIXED + meta_len > size {
        return Err(FormatError::Truncated);
    }
    let rest =
        read_at(file, 8, usize::try_from(meta_len + 16).unwrap_or(0)).map_err(eof_truncated)?;
    let (meta, tail) = rest.split_at(rest.len() - 16);
    let body_len = u64::from_le_bytes(tail[..8].try_into().unwrap_or_default());
    let sum = u64::from_le_bytes(tail[8..].try_into().unwrap_or_default());
    let mut head = fixed.to_vec();
    head.extend_from_slice(&rest[..rest.len() - 8]);
    if xxh3_64(&head) != sum {
        return Err(FormatError::Checksum);
    }
    let declared = file_size(meta_len, body_len).ok_or(FormatError::Invalid("body length"))?;
    if declared != size {
        return Err(FormatError::Length {
            declared,
            actual: size,
        });
    }
    Ok((decode_meta(meta)?, meta_len, body_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata of a 200 for key `k`, no fields.
    fn meta() -> Vec<u8> {
        let mut m = 1u32.to_le_bytes().to_vec();
        m.push(b'k');
        m.extend(200u16.to_le_bytes());
        for _ in 0..2 {
            m.push(0);
            m.extend(0u64.to_le_bytes());
            m.extend(0u32.to_le_bytes());
        }
        m.extend(0u32.to_le_bytes());
        m.extend(0u32.to_le_bytes());
        m
    }

    fn write(dir: &Path, body: &[u8], chunk: usize) -> std::path::PathBuf {
        let path = dir.join("f");
        let mut w = BlockWriter::create(&path, &meta()).unwrap();
        for c in body.chunks(chunk.max(1)) {
            w.write(c).unwrap();
        }
        assert_eq!(w.len(), body.len() as u64);
        let (len, size) = w.finish().unwrap();
        assert_eq!(len, body.len() as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        path
    }

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn open(path: &Path) -> Result<BlockFile, FormatError> {
        let size = std::fs::metadata(path).unwrap().len();
        BlockFile::open(File::open(path).unwrap(), size).map(|(_, b)| b)
    }

    #[test]
    fn round_trip_at_block_edges() {
        let dir = tempfile::tempdir().unwrap();
        let b = BLOCK as usize;
        for n in [0, 1, b - 1, b, b + 1, 3 * b + 17] {
            let data = body(n);
            let path = write(dir.path(), &data, 70_000);
            let f = open(&path).unwrap();
            assert_eq!(f.len(), n as u64);
            assert_eq!(f.read_all().unwrap(), data, "n={n}");
            if n > 10 {
                // The last 10 bytes may span two blocks: each read stops at a block end.
                let (mut s, e) = (n as u64 - 10, n as u64);
                let mut got = Vec::new();
                while s < e {
                    let part = f.read_from(s, e).unwrap();
                    s += part.len() as u64;
                    got.extend_from_slice(&part);
                }
                assert_eq!(got, data[n - 10..]);
            }
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn range_reads_stop_at_the_block_end() {
        let dir = tempfile::tempdir().unwrap();
        let data = body(2 * BLOCK as usize + 5);
        let f = open(&write(dir.path(), &data, 4096)).unwrap();
        let got = f.read_from(BLOCK - 3, 2 * BLOCK + 2).unwrap();
        assert_eq!(got, data[BLOCK as usize - 3..BLOCK as usize]);
        let got = f.read_from(2 * BLOCK, 2 * BLOCK + 5).unwrap();
        assert_eq!(got, data[2 * BLOCK as usize..]);
    }

    #[test]
    fn a_damaged_block_is_refused_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let data = body(2 * BLOCK as usize);
        let path = write(dir.path(), &data, 1 << 16);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        // One byte of the second block.
        let body_start = HEAD_FIXED + meta().len() as u64;
        file.write_all_at(b"\xff", body_start + BLOCK + 10).unwrap();
        let mut f = open(&path).unwrap();
        let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let h = hits.clone();
        f.on_corrupt(Box::new(move || {
            h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        assert!(f.block(0).is_ok());
        assert!(matches!(f.block(1), Err(FormatError::Checksum)));
        assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn unfinished_truncated_or_bad_heads_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Never finished: body_len and sum still zero.
        let path = dir.path().join("unfinished");
        let mut w = BlockWriter::create(&path, &meta()).unwrap();
        w.write(&body(BLOCK as usize + 1)).unwrap();
        drop(w);
        assert!(open(&path).is_err());
        // Cut short.
        let path = write(dir.path(), &body(BLOCK as usize + 100), 1000);
        let size = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size - 1)
            .unwrap();
        assert!(matches!(open(&path), Err(FormatError::Length { .. })));
        // Head damaged.
        std::fs::remove_file(&path).unwrap();
        let path = write(dir.path(), &body(10), 10);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0x7f], 8).unwrap();
        assert!(open(&path).is_err());
    }
}
