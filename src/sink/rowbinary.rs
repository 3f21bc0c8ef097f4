//! ClickHouse `RowBinary` encoding and decoding of the few types tally writes and reads.

/// Appends RowBinary values to a buffer.
#[derive(Debug, Default)]
pub struct RowWriter {
    pub buf: Vec<u8>,
}

impl RowWriter {
    #[inline]
    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    #[inline]
    pub fn string(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    #[inline]
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// `DateTime` is seconds since the epoch as UInt32; out-of-range values are clamped. Returns
    /// the value written.
    #[inline]
    pub fn datetime(&mut self, secs: i64) -> u32 {
        let v = secs.clamp(0, i64::from(u32::MAX)) as u32;
        self.u32(v);
        v
    }
}

/// Reads RowBinary values from a response body.
pub struct RowReader<'a> {
    buf: &'a [u8],
}

/// The response ended in the middle of a value.
#[derive(Debug, thiserror::Error)]
#[error("truncated RowBinary response")]
pub struct Truncated;

impl<'a> RowReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        RowReader { buf }
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.buf.len() < n {
            return Err(Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn varint(&mut self) -> Result<u64, Truncated> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(Truncated)
    }
    pub fn string(&mut self) -> Result<&'a [u8], Truncated> {
        let n = self.varint()? as usize;
        self.take(n)
    }
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// `UInt32`, and `DateTime` (seconds since the epoch).
    #[cfg(test)]
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    /// What is left to read.
    #[cfg(test)]
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = RowWriter::default();
        w.string("héllo");
        w.varint(300);
        w.u64(u64::MAX);
        w.string("");
        let mut r = RowReader::new(&w.buf);
        assert_eq!(r.string().unwrap(), "héllo".as_bytes());
        assert_eq!(r.varint().unwrap(), 300);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.string().unwrap(), b"");
        assert!(r.is_empty());
        assert!(r.u64().is_err());
    }

    #[test]
    fn varint_matches_leb128() {
        let mut w = RowWriter::default();
        w.varint(127);
        w.varint(128);
        assert_eq!(w.buf, [0x7f, 0x80, 0x01]);
    }
}
