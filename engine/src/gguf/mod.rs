//! GGUF reader: header, metadata and tensor directory, with tensor data borrowed
//! straight from a memory map.
//!
//! The file is untrusted input. Every count and length is checked against the bytes
//! that are actually left before anything is allocated, so a lying header gives an
//! error naming the problem instead of a panic or a multi-gigabyte allocation.
//! The tensor types the reader accepts and their block layouts are in `quant`.

pub mod quant;
pub mod synth;
pub mod tiny;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::GgufError;
use crate::gguf::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deeper than any real model needs; bounds recursion on nested arrays.
const MAX_ARRAY_DEPTH: u32 = 2;
const MAX_DIMS: u32 = 4;

/// A metadata value as stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first, as GGUF stores them: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Number of elements in the tensor.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file whose tensor bytes stay in the memory map.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data: Bytes,
}

/// The bytes behind a file: a memory map for real files, a vector for tests and fuzzing.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file =
            File::open(path).map_err(|e| GgufError::Io(format!("{}: {e}", path.display())))?;
        // SAFETY: the map is read-only; the model file is not expected to change while
        // we serve it (as with llama.cpp, truncating it underneath us is unsupported).
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| GgufError::Io(format!("{}: {e}", path.display())))?;
        Self::parse(Bytes::Mapped(map))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(data: Bytes) -> Result<Self, GgufError> {
        let mut r = Reader { buf: &data, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic);
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each metadata entry takes at least 12 bytes and each tensor entry at least 24:
        // a count larger than the file could hold is a lie, refused before allocating.
        let left = r.remaining() as u64;
        if n_kv > left / 12 {
            return Err(GgufError::Corrupt(format!(
                "metadata count {n_kv} exceeds what the file can hold"
            )));
        }
        if n_tensors > left / 24 {
            return Err(GgufError::Corrupt(format!(
                "tensor count {n_tensors} exceeds what the file can hold"
            )));
        }

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, 0, &key)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(GgufError::Corrupt(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            },
        };

        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name}: {n_dims} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let raw_ty = r.u32("tensor type")?;
            let ty = GgmlType::from_u32(raw_ty).ok_or(GgufError::UnknownTensorType {
                tensor: name.clone(),
                ty: raw_ty,
            })?;
            let offset = r.u64("tensor offset")?;
            infos.push((name, dims, ty, offset));
        }

        let data_start = align_up(r.pos as u64, alignment);
        let file_len = data.len() as u64;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, rel_offset) in infos {
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    GgufError::Corrupt(format!("tensor {name}: element count overflows"))
                })?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name}: row length {} is not a multiple of the {} block size {}",
                    dims[0],
                    ty.name(),
                    ty.block_size()
                )));
            }
            let n_bytes = (n_elements / ty.block_size() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| GgufError::Corrupt(format!("tensor {name}: byte size overflows")))?;
            if rel_offset % alignment != 0 {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name}: offset {rel_offset} is not aligned to {alignment}"
                )));
            }
            let start = data_start.checked_add(rel_offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => {
                    let info = TensorInfo {
                        name: name.clone(),
                        dims,
                        ty,
                        offset: start as usize,
                        n_bytes: n_bytes as usize,
                    };
                    if tensors.insert(name.clone(), info).is_some() {
                        return Err(GgufError::Corrupt(format!("tensor {name} appears twice")));
                    }
                }
                _ => {
                    return Err(GgufError::Truncated(format!(
                        "tensor {name} needs bytes up to {} but the file has {file_len}",
                        end.map_or_else(|| "overflow".to_string(), |e| e.to_string())
                    )))
                }
            }
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            data,
        })
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.data[info.offset..info.offset + info.n_bytes]
    }

    /// Bytes at an absolute range previously validated by the parser.
    pub(crate) fn tensor_bytes_at(&self, offset: usize, len: usize) -> &[u8] {
        &self.data[offset..offset + len]
    }

    /// Looks up a metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer metadata value.
    pub fn meta_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.meta(key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| GgufError::MissingMetadata(key.to_string()))
    }

    /// A required string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str, GgufError> {
        self.meta(key)
            .and_then(MetaValue::as_str)
            .ok_or_else(|| GgufError::MissingMetadata(key.to_string()))
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated(format!(
                "{what} at byte {} needs {n} bytes, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(GgufError::Truncated(format!(
                "{what} claims {len} bytes, {} left",
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        // Vocabularies contain the odd invalid sequence; keep them readable, not fatal.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => MetaValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Corrupt(format!(
                        "metadata {key}: arrays nested too deeply"
                    )));
                }
                let elem_ty = self.u32(key)?;
                let count = self.u64(key)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(GgufError::Corrupt(format!(
                            "metadata {key}: unknown array element type {other}"
                        )))
                    }
                };
                if count > (self.remaining() / min_size) as u64 {
                    return Err(GgufError::Truncated(format!(
                        "metadata {key}: array of {count} elements exceeds the file"
                    )));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, depth + 1, key)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "metadata {key}: unknown value type {other}"
                )))
            }
        })
    }
}

/// Writes GGUF files; used by tests to build tiny models and by fuzz seeds.
pub mod writer {
    use super::MetaValue;
    use crate::gguf::quant::GgmlType;

    /// A tensor to write: name, dims (innermost first), type and raw bytes.
    pub struct TensorData {
        pub name: String,
        pub dims: Vec<u64>,
        pub ty: GgmlType,
        pub bytes: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::Str(s) => put_str(out, s),
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Array(items) => {
                let elem = items.first().map_or(4, type_id);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
        }
    }

    /// GGUF's data alignment (the default, which we never override).
    pub const ALIGNMENT: u64 = 32;

    /// A tensor's entry in the header: what [`header`] needs to place its data.
    pub struct TensorHeader<'a> {
        pub name: &'a str,
        pub dims: &'a [u64],
        pub ty: GgmlType,
        pub bytes: u64,
    }

    /// The bytes of a GGUF v3 file up to its first tensor's data: the header, metadata,
    /// tensor infos and padding. Tensor `i`'s data follows at the next multiple of
    /// [`ALIGNMENT`] after tensor `i - 1`'s (for writers that stream the data, such as
    /// `model synth`'s multi-gigabyte files).
    pub fn header(metadata: &[(String, MetaValue)], tensors: &[TensorHeader<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&(t.ty as u32).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += t.bytes.div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        pad(&mut out);
        out
    }

    /// Zero bytes up to the next multiple of [`ALIGNMENT`].
    pub fn pad(out: &mut Vec<u8>) {
        while !(out.len() as u64).is_multiple_of(ALIGNMENT) {
            out.push(0);
        }
    }

    /// Serialises metadata and tensors into a GGUF v3 image (alignment 32).
    pub fn write(metadata: &[(String, MetaValue)], tensors: &[TensorData]) -> Vec<u8> {
        let headers: Vec<TensorHeader<'_>> = tensors
            .iter()
            .map(|t| TensorHeader {
                name: &t.name,
                dims: &t.dims,
                ty: t.ty,
                bytes: t.bytes.len() as u64,
            })
            .collect();
        let mut out = header(metadata, &headers);
        for t in tensors {
            out.extend_from_slice(&t.bytes);
            pad(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{write, TensorData};
    use super::*;

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::Str("llama".into()),
            ),
            ("llama.block_count".to_string(), MetaValue::U32(2)),
            (
                "list".to_string(),
                MetaValue::Array(vec![
                    MetaValue::Str("a".into()),
                    MetaValue::Str("bc".into()),
                ]),
            ),
        ];
        let tensors = vec![
            TensorData {
                name: "a".into(),
                dims: vec![4, 2],
                ty: GgmlType::F32,
                bytes: vec![1u8; 32],
            },
            TensorData {
                name: "b".into(),
                dims: vec![32],
                ty: GgmlType::Q8_0,
                bytes: vec![2u8; 34],
            },
        ];
        write(&meta, &tensors)
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let f = GgufFile::from_bytes(sample()).unwrap();
        assert_eq!(f.meta_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.meta_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.meta("list").unwrap().as_array().unwrap().len(), 2);
        let b = &f.tensors["b"];
        assert_eq!(b.ty, GgmlType::Q8_0);
        assert_eq!(f.tensor_bytes(b), &[2u8; 34][..]);
        assert_eq!(f.tensor_bytes(&f.tensors["a"]), &[1u8; 32][..]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        let full = GgufFile::from_bytes(bytes.clone()).unwrap();
        let data_end = full
            .tensors
            .values()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap();
        // Cutting only alignment padding after the last tensor leaves a valid file.
        for len in 0..data_end {
            let r = GgufFile::from_bytes(bytes[..len].to_vec());
            assert!(r.is_err(), "truncated to {len} bytes parsed");
        }
    }

    #[test]
    fn lying_counts_are_refused_without_allocating() {
        let mut bytes = sample();
        // tensor count at offset 8: claim 2^60 tensors
        bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let e = GgufFile::from_bytes(bytes).err().unwrap();
        assert!(e.to_string().contains("tensor count"), "{e}");

        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::BadMagic)
        ));
    }

    #[test]
    fn unknown_tensor_type_is_named() {
        let mut bytes = sample();
        // Patch the type of tensor "b": find its name then skip dims.
        let pos = bytes
            .windows(9)
            .position(|w| w == b"\x01\0\0\0\0\0\0\0b")
            .unwrap()
            + 9;
        let ty_pos = pos + 4 + 8;
        bytes[ty_pos..ty_pos + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = GgufFile::from_bytes(bytes).err().unwrap();
        assert!(
            matches!(e, GgufError::UnknownTensorType { ty: 99, .. }),
            "{e}"
        );
    }
}
