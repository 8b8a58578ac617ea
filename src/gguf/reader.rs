//! GGUF reader: parses and validates the header, metadata and tensor table of
//! a memory-mapped file (layout: ggml's `docs/gguf.md`, versions 2 and 3,
//! little-endian).
//!
//! Every count and length read from the file is checked against the bytes
//! that remain before anything is allocated for it, so a hostile or damaged
//! file gets a typed error, never a huge allocation or a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::codec::{self, CodecError};
use super::keys;
use super::types::GgmlType;
use super::value::{Array, Value, ValueType};
use super::GgufError;

/// `GGUF` read as a little-endian u32.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// ggml's `GGML_MAX_NAME` (64) minus the terminating NUL.
pub const MAX_TENSOR_NAME: usize = 63;

/// Everything wrong a GGUF byte stream can be. Offsets are byte positions in
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic { found: Vec<u8> },
    #[error("GGUF version {0} is not supported (qcoder reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("file is truncated: {what} at byte {offset} needs {need} bytes, only {have} left")]
    Truncated {
        what: String,
        offset: usize,
        need: u64,
        have: usize,
    },
    #[error(
        "{what} is {count}, which cannot fit in the {remaining} bytes left after byte {offset}"
    )]
    CountTooLarge {
        what: String,
        count: u64,
        offset: usize,
        remaining: usize,
    },
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: String },
    #[error("metadata key `{key}` has unknown value type {id}")]
    UnknownValueType { key: String, id: u32 },
    #[error("metadata key `{key}` is a nested array, which is not supported")]
    NestedArray { key: String },
    #[error("metadata key `{key}` holds bool byte {byte} (must be 0 or 1)")]
    InvalidBool { key: String, byte: u8 },
    #[error("metadata key `{key}` appears twice")]
    DuplicateKey { key: String },
    #[error("`general.alignment` is {0}; it must be a power of two and a multiple of 8")]
    BadAlignment(u64),
    #[error("`general.alignment` has type {0}; it must be u32")]
    AlignmentType(String),
    #[error("tensor `{tensor}` has {n_dims} dimensions (at most {MAX_DIMS} are allowed)")]
    TooManyDims { tensor: String, n_dims: u32 },
    #[error("tensor `{tensor}` has unknown type id {id}")]
    UnknownTensorType { tensor: String, id: u32 },
    #[error("tensor `{tensor}`: {msg}")]
    BadShape { tensor: String, msg: String },
    #[error("tensor name `{name}...` is longer than {MAX_TENSOR_NAME} bytes")]
    NameTooLong { name: String },
    #[error("tensor `{0}` appears twice")]
    DuplicateTensor(String),
    #[error("tensor `{tensor}` has data offset {offset}, which is not a multiple of the alignment {alignment}")]
    UnalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor `{tensor}` data ends at byte {end}, beyond the end of the file ({file_len} bytes)"
    )]
    DataBeyondEof {
        tensor: String,
        end: u128,
        file_len: usize,
    },
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (the row length). An HF weight of
    /// shape `[out, in]` is stored with `dims = [in, out]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data (validated not to overflow when the table was parsed).
    pub fn n_bytes(&self) -> u64 {
        self.ty.bytes_for(self.n_elements()).unwrap_or(0)
    }

    /// Length of a row (`dims[0]`, 1 for a scalar).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// The shape in PyTorch/HF order (slowest dimension first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed header: version, metadata and tensor table.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], ParseError> {
        if n > self.remaining() as u64 {
            return Err(ParseError::Truncated {
                what: what(),
                offset: self.pos,
                need: n,
                have: self.remaining(),
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], ParseError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_item` bytes each, checked against
    /// the bytes that remain.
    fn count(&mut self, min_item: usize, what: &dyn Fn() -> String) -> Result<usize, ParseError> {
        let offset = self.pos;
        let count = self.u64(what)?;
        let fits = count
            .checked_mul(min_item as u64)
            .is_some_and(|bytes| bytes <= self.remaining() as u64);
        if !fits {
            return Err(ParseError::CountTooLarge {
                what: what(),
                count,
                offset,
                remaining: self.remaining(),
            });
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, ParseError> {
        let len = self.count(1, &|| format!("length of {}", what()))?;
        let bytes = self.take(len as u64, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ParseError::InvalidUtf8 { what: what() })
    }
}

fn read_scalar(c: &mut Cursor<'_>, ty: ValueType, key: &str) -> Result<Value, ParseError> {
    let what = || format!("value of `{key}`");
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(what)?[0]),
        ValueType::I8 => Value::I8(c.array::<1>(what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(what)?)),
        ValueType::Bool => match c.array::<1>(what)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            byte => {
                return Err(ParseError::InvalidBool {
                    key: key.to_string(),
                    byte,
                })
            }
        },
        ValueType::String => Value::String(c.string(&what)?),
        ValueType::Array => unreachable!("arrays are read by read_value"),
    })
}

fn read_value(c: &mut Cursor<'_>, key: &str) -> Result<Value, ParseError> {
    let id = c.u32(|| format!("value type of `{key}`"))?;
    let ty = ValueType::from_id(id).ok_or_else(|| ParseError::UnknownValueType {
        key: key.to_string(),
        id,
    })?;
    if ty != ValueType::Array {
        return read_scalar(c, ty, key);
    }
    let elem_id = c.u32(|| format!("element type of `{key}`"))?;
    let elem = ValueType::from_id(elem_id).ok_or_else(|| ParseError::UnknownValueType {
        key: key.to_string(),
        id: elem_id,
    })?;
    if elem == ValueType::Array {
        return Err(ParseError::NestedArray {
            key: key.to_string(),
        });
    }
    let n = c.count(elem.min_size(), &|| format!("length of array `{key}`"))?;
    // `n` items fit in the remaining bytes, so these allocations are bounded
    // by the file size.
    macro_rules! collect {
        ($variant:ident, $t:ty) => {{
            let what = || format!("array `{key}`");
            let bytes = c.take((n * std::mem::size_of::<$t>()) as u64, what)?;
            Array::$variant(
                bytes
                    .chunks_exact(std::mem::size_of::<$t>())
                    .map(|b| <$t>::from_le_bytes(b.try_into().unwrap_or_default()))
                    .collect(),
            )
        }};
    }
    let array = match elem {
        ValueType::U8 => Array::U8(c.take(n as u64, || format!("array `{key}`"))?.to_vec()),
        ValueType::I8 => Array::I8(
            c.take(n as u64, || format!("array `{key}`"))?
                .iter()
                .map(|&b| b as i8)
                .collect(),
        ),
        ValueType::U16 => collect!(U16, u16),
        ValueType::I16 => collect!(I16, i16),
        ValueType::U32 => collect!(U32, u32),
        ValueType::I32 => collect!(I32, i32),
        ValueType::F32 => collect!(F32, f32),
        ValueType::U64 => collect!(U64, u64),
        ValueType::I64 => collect!(I64, i64),
        ValueType::F64 => collect!(F64, f64),
        ValueType::Bool => {
            let bytes = c.take(n as u64, || format!("array `{key}`"))?;
            let mut out = Vec::with_capacity(n);
            for &byte in bytes {
                match byte {
                    0 => out.push(false),
                    1 => out.push(true),
                    _ => {
                        return Err(ParseError::InvalidBool {
                            key: key.to_string(),
                            byte,
                        })
                    }
                }
            }
            Array::Bool(out)
        }
        ValueType::String => {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                out.push(c.string(&|| format!("item {i} of `{key}`"))?);
            }
            Array::String(out)
        }
        ValueType::Array => unreachable!("rejected above"),
    };
    Ok(Value::Array(array))
}

impl Header {
    /// Parses and validates a whole GGUF file held in `bytes` (tensor data
    /// included: every tensor must lie inside `bytes`).
    pub fn parse(bytes: &[u8]) -> Result<Header, ParseError> {
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic = c.take(4, || "magic".into())?;
        if magic != MAGIC {
            return Err(ParseError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = c.u32(|| "version".into())?;
        match version {
            2 | 3 => {}
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => return Err(ParseError::BigEndian),
            v => return Err(ParseError::UnsupportedVersion(v)),
        }
        // Smallest possible tensor info: 8-byte name length, u32 n_dims,
        // u32 type, u64 offset; smallest KV: key length, type, one byte.
        let n_tensors = {
            let offset = c.pos;
            let n = c.u64(|| "tensor count".into())?;
            (n, offset)
        };
        let n_kv = c.count(8 + 4 + 1, &|| "metadata key/value count".into())?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let value = read_value(&mut c, &key)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(ParseError::DuplicateKey { key });
            }
            metadata.push((key, value));
        }
        let alignment = match index.get(keys::general::ALIGNMENT).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) => {
                let a = *a as u64;
                if a == 0 || !a.is_power_of_two() || !a.is_multiple_of(8) {
                    return Err(ParseError::BadAlignment(a));
                }
                a
            }
            Some(other) => return Err(ParseError::AlignmentType(other.type_name())),
        };
        let (n_tensors, count_offset) = n_tensors;
        let min_info = 8 + 4 + 4 + 8;
        if n_tensors
            .checked_mul(min_info)
            .is_none_or(|b| b > c.remaining() as u64)
        {
            return Err(ParseError::CountTooLarge {
                what: "tensor count".into(),
                count: n_tensors,
                offset: count_offset,
                remaining: c.remaining(),
            });
        }
        let n_tensors = n_tensors as usize;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i}"))?;
            if name.len() > MAX_TENSOR_NAME {
                return Err(ParseError::NameTooLong {
                    name: name.chars().take(MAX_TENSOR_NAME).collect(),
                });
            }
            let n_dims = c.u32(|| format!("dimension count of tensor `{name}`"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(ParseError::TooManyDims {
                    tensor: name,
                    n_dims,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(|| format!("dimension {d} of tensor `{name}`"))?);
            }
            let type_id = c.u32(|| format!("type of tensor `{name}`"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| ParseError::UnknownTensorType {
                tensor: name.clone(),
                id: type_id,
            })?;
            let offset = c.u64(|| format!("data offset of tensor `{name}`"))?;
            let bad = |msg: String| ParseError::BadShape {
                tensor: name.clone(),
                msg,
            };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let row = dims.first().copied().unwrap_or(1);
            if row % ty.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "row length {row} is not a multiple of the {ty} block size {}",
                    ty.block_size()
                )));
            }
            ty.bytes_for(n_elements)
                .ok_or_else(|| bad(format!("byte size of {n_elements} {ty} values overflows")))?;
            if offset % alignment != 0 {
                return Err(ParseError::UnalignedOffset {
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(ParseError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset as u128 + t.offset as u128 + t.n_bytes() as u128;
            if end > bytes.len() as u128 {
                return Err(ParseError::DataBeyondEof {
                    tensor: t.name.clone(),
                    end,
                    file_len: bytes.len(),
                });
            }
        }
        Ok(Header {
            version,
            metadata,
            index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

/// A memory-mapped, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub header: Header,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |error| GgufError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only mapping of a file qcoder does not write while
        // reading it; a concurrent truncation by another process is the usual
        // mmap caveat, shared with every GGUF and safetensors reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = Header::parse(&mmap).map_err(|error| GgufError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Raw bytes of a tensor (bounds were validated by [`Header::parse`]).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.n_bytes() as usize]
    }

    /// A tensor decoded to f32, in ggml order (row-major with rows of
    /// `dims[0]`, the same memory order as the HF tensor of the reversed shape).
    pub fn decode(&self, t: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        codec::decode(t.ty, self.data(t), t.row_len(), t.n_elements() as usize).map_err(
            |error: CodecError| GgufError::Codec {
                path: self.path.clone(),
                tensor: t.name.clone(),
                error,
            },
        )
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.header
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    // Typed metadata access; errors name the file and the key.

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.get(key)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> GgufError {
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: v.type_name(),
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong(key, "unsigned integer", v))
            })
            .transpose()
    }

    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "number", v)))
            .transpose()
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(key, "string", v)))
            .transpose()
    }

    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "bool", v)))
            .transpose()
    }

    pub fn opt_strings(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(Array::as_strings)
                    .ok_or_else(|| self.wrong(key, "array of strings", v))
            })
            .transpose()
    }

    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(Array::to_i64_vec)
                    .ok_or_else(|| self.wrong(key, "array of integers", v))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-assembled GGUF byte stream.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
            let mut r = Raw::default();
            r.0.extend_from_slice(b"GGUF");
            r.u32(version).u64(n_tensors).u64(n_kv);
            r
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.str(key).u32(ValueType::U32 as u32).u32(v)
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(ty).u64(offset)
        }
        /// Pads to the 32-byte alignment and appends `n` data bytes.
        fn data(&mut self, n: usize) -> &mut Self {
            while !self.0.len().is_multiple_of(32) {
                self.0.push(0);
            }
            self.0.extend(std::iter::repeat_n(0u8, n));
            self
        }
    }

    fn err(bytes: &[u8]) -> ParseError {
        match Header::parse(bytes) {
            Ok(_) => panic!("parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_minimal_file_parses() {
        let mut r = Raw::header(3, 1, 1);
        r.kv_u32("general.alignment", 32)
            .tensor("w", &[4, 2], 0, 0)
            .data(32);
        let h = Header::parse(&r.0).unwrap();
        assert_eq!(h.alignment, 32);
        assert_eq!(h.tensors[0].dims, vec![4, 2]);
        assert_eq!(h.tensors[0].n_bytes(), 32);
        assert_eq!(h.data_offset % 32, 0);
        assert_eq!(h.get("general.alignment"), Some(&Value::U32(32)));
    }

    #[test]
    fn every_kind_of_bad_input_is_a_typed_error() {
        assert!(matches!(
            err(b"GGML\x03\0\0\0"),
            ParseError::BadMagic { .. }
        ));
        assert!(matches!(
            err(&Raw::header(1, 0, 0).0),
            ParseError::UnsupportedVersion(1)
        ));
        assert!(matches!(
            err(&Raw::header(3u32.swap_bytes(), 0, 0).0),
            ParseError::BigEndian
        ));
        assert!(matches!(
            err(b"GGUF\x03\0\0\0\x01"),
            ParseError::Truncated { .. }
        ));
        // Counts and lengths larger than the file.
        assert!(matches!(
            err(&Raw::header(3, u64::MAX, 0).0),
            ParseError::CountTooLarge { .. }
        ));
        assert!(matches!(
            err(&Raw::header(3, 0, 1 << 40).0),
            ParseError::CountTooLarge { .. }
        ));
        let mut r = Raw::header(3, 0, 1);
        r.u64(u64::MAX - 3);
        assert!(matches!(err(&r.0), ParseError::CountTooLarge { .. }));
        let mut r = Raw::header(3, 0, 1);
        r.str("k")
            .u32(ValueType::Array as u32)
            .u32(ValueType::String as u32)
            .u64(1 << 50);
        assert!(matches!(err(&r.0), ParseError::CountTooLarge { .. }));
        // Value types.
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(13).u32(0);
        assert!(matches!(
            err(&r.0),
            ParseError::UnknownValueType { id: 13, .. }
        ));
        let mut r = Raw::header(3, 0, 1);
        r.str("k")
            .u32(ValueType::Array as u32)
            .u32(ValueType::Array as u32)
            .u64(0);
        assert!(matches!(err(&r.0), ParseError::NestedArray { .. }));
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(ValueType::Bool as u32).0.push(7);
        assert!(matches!(err(&r.0), ParseError::InvalidBool { byte: 7, .. }));
        let mut r = Raw::header(3, 0, 2);
        r.kv_u32("k", 1).kv_u32("k", 2);
        assert!(matches!(err(&r.0), ParseError::DuplicateKey { .. }));
        let mut r = Raw::header(3, 0, 1);
        r.str("k")
            .u32(ValueType::String as u32)
            .str("\u{0}")
            .0
            .pop();
        r.0.push(0xff);
        assert!(matches!(err(&r.0), ParseError::InvalidUtf8 { .. }));
        // Alignment.
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", 12);
        assert!(matches!(err(&r.0), ParseError::BadAlignment(12)));
        let mut r = Raw::header(3, 0, 1);
        r.str("general.alignment")
            .u32(ValueType::U64 as u32)
            .u64(32);
        assert!(matches!(err(&r.0), ParseError::AlignmentType(_)));
        // Tensor infos.
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[1, 1, 1, 1, 1], 0, 0).data(4);
        assert!(matches!(
            err(&r.0),
            ParseError::TooManyDims { n_dims: 5, .. }
        ));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[32], 4, 0).data(64);
        assert!(matches!(
            err(&r.0),
            ParseError::UnknownTensorType { id: 4, .. }
        ));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[16], 2, 0).data(64);
        assert!(matches!(err(&r.0), ParseError::BadShape { .. }));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[u64::MAX, 4], 0, 0).data(64);
        assert!(matches!(err(&r.0), ParseError::BadShape { .. }));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[4], 0, 8).data(64);
        assert!(matches!(
            err(&r.0),
            ParseError::UnalignedOffset { offset: 8, .. }
        ));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[64], 0, 0).data(64);
        assert!(matches!(err(&r.0), ParseError::DataBeyondEof { .. }));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[4], 0, u64::MAX - 31).data(64);
        assert!(matches!(err(&r.0), ParseError::DataBeyondEof { .. }));
        let mut r = Raw::header(3, 2, 0);
        r.tensor("w", &[4], 0, 0).tensor("w", &[4], 0, 32).data(64);
        assert!(matches!(err(&r.0), ParseError::DuplicateTensor(_)));
        let long = "x".repeat(80);
        let mut r = Raw::header(3, 1, 0);
        r.tensor(&long, &[4], 0, 0).data(64);
        assert!(matches!(err(&r.0), ParseError::NameTooLong { .. }));
    }

    #[test]
    fn every_prefix_of_a_valid_file_fails_cleanly() {
        let mut r = Raw::header(3, 2, 2);
        r.kv_u32("general.alignment", 32);
        r.str("tokens")
            .u32(ValueType::Array as u32)
            .u32(ValueType::String as u32)
            .u64(2)
            .str("a")
            .str("bc");
        // Q8_0 [32, 2] takes 68 bytes (padded to 96), then 16 bytes of F32.
        r.tensor("w", &[32, 2], 8, 0)
            .tensor("b", &[4], 0, 96)
            .data(112);
        let full = r.0;
        Header::parse(&full).unwrap();
        for n in 0..full.len() {
            if let Ok(h) = Header::parse(&full[..n]) {
                panic!("prefix of {n} bytes parsed: {h:?}");
            }
        }
    }
}
