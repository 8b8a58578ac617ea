//! GGUF writer: an explicit state machine over the file's sections, in the
//! order they appear on disk (as gguf-py's `GGUFWriter`):
//!
//! ```text
//! Metadata ──add_tensor──▶ TensorInfos ──write_header──▶ Data ──finish──▶ Done
//!  (add_kv)                 (add_tensor)                  (write_tensor, in order)
//! ```
//!
//! Everything about the header (keys, values, tensor names, shapes, types and
//! aligned offsets) is declared first; the header is then written in one go
//! and the tensor data streamed in declaration order, each tensor padded to
//! the alignment. Calls in the wrong state are errors, not panics.

use std::collections::HashSet;
use std::io::Write;

use super::keys;
use super::reader::{TensorInfo, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_TENSOR_NAME};
use super::types::GgmlType;
use super::value::{Array, Value};

/// The GGUF version qcoder writes.
pub const VERSION: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterState {
    Metadata,
    TensorInfos,
    Data,
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("GGUF writer: cannot {op} in state {state:?}")]
    WrongState {
        op: &'static str,
        state: WriterState,
    },
    #[error("metadata key `{0}` was added twice")]
    DuplicateKey(String),
    #[error("tensor `{name}`: {msg}")]
    BadTensor { name: String, msg: String },
    #[error("expected data of tensor `{expected}` next, got `{got}`")]
    OutOfOrder { expected: String, got: String },
    #[error("tensor `{name}`: {got} bytes of data given, its {ty} shape needs {want}")]
    Size {
        name: String,
        ty: GgmlType,
        got: usize,
        want: u64,
    },
    #[error("{missing} declared tensors were never written")]
    Incomplete { missing: usize },
    #[error("writing GGUF: {0}")]
    Io(#[from] std::io::Error),
}

pub struct GgufWriter<W: Write> {
    out: W,
    state: WriterState,
    alignment: u64,
    kv: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<TensorInfo>,
    names: HashSet<String>,
    /// Size of the data section declared so far.
    data_size: u64,
    /// Next tensor whose data is expected, and bytes of data written so far.
    next: usize,
    written: u64,
}

impl<W: Write> GgufWriter<W> {
    /// A writer with the default alignment (32, written as `general.alignment`).
    pub fn new(out: W) -> Self {
        let mut w = Self {
            out,
            state: WriterState::Metadata,
            alignment: DEFAULT_ALIGNMENT,
            kv: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            data_size: 0,
            next: 0,
            written: 0,
        };
        w.kv.push((
            keys::general::ALIGNMENT.to_string(),
            Value::U32(DEFAULT_ALIGNMENT as u32),
        ));
        w.keys.insert(keys::general::ALIGNMENT.to_string());
        w
    }

    pub fn state(&self) -> WriterState {
        self.state
    }

    fn expect(&self, op: &'static str, allowed: &[WriterState]) -> Result<(), WriterError> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(WriterError::WrongState {
                op,
                state: self.state,
            })
        }
    }

    pub fn add_kv(&mut self, key: &str, value: Value) -> Result<(), WriterError> {
        self.expect("add metadata", &[WriterState::Metadata])?;
        if !self.keys.insert(key.to_string()) {
            return Err(WriterError::DuplicateKey(key.to_string()));
        }
        self.kv.push((key.to_string(), value));
        Ok(())
    }

    /// Declares a tensor (`dims` in ggml order: row length first).
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
    ) -> Result<(), WriterError> {
        self.expect(
            "declare a tensor",
            &[WriterState::Metadata, WriterState::TensorInfos],
        )?;
        let bad = |msg: String| WriterError::BadTensor {
            name: name.to_string(),
            msg,
        };
        if name.len() > MAX_TENSOR_NAME {
            return Err(bad(format!("name is longer than {MAX_TENSOR_NAME} bytes")));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(bad(format!(
                "{} dimensions (1 to {MAX_DIMS} allowed)",
                dims.len()
            )));
        }
        if !self.names.insert(name.to_string()) {
            return Err(bad("declared twice".into()));
        }
        let n: u64 = dims.iter().product();
        if !dims[0].is_multiple_of(ty.block_size() as u64) {
            return Err(bad(format!(
                "row length {} is not a multiple of the {ty} block size {}",
                dims[0],
                ty.block_size()
            )));
        }
        let bytes = ty
            .bytes_for(n)
            .ok_or_else(|| bad("size overflows".into()))?;
        let offset = self.data_size.div_ceil(self.alignment) * self.alignment;
        self.data_size = offset + bytes;
        self.tensors.push(TensorInfo {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            offset,
        });
        self.state = WriterState::TensorInfos;
        Ok(())
    }

    /// Writes magic, version, counts, key/values, tensor infos and the padding
    /// before the data section.
    pub fn write_header(&mut self) -> Result<(), WriterError> {
        self.expect(
            "write the header",
            &[WriterState::Metadata, WriterState::TensorInfos],
        )?;
        let mut buf = Vec::new();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (key, value) in &self.kv {
            put_str(&mut buf, key);
            put_value(&mut buf, value);
        }
        for t in &self.tensors {
            put_str(&mut buf, &t.name);
            buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            buf.extend_from_slice(&t.ty.id().to_le_bytes());
            buf.extend_from_slice(&t.offset.to_le_bytes());
        }
        let padded = (buf.len() as u64).div_ceil(self.alignment) * self.alignment;
        buf.resize(padded as usize, 0);
        self.out.write_all(&buf)?;
        self.state = WriterState::Data;
        Ok(())
    }

    /// The declared tensors, in the order their data must be written.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Writes the data of the next declared tensor.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriterError> {
        self.expect("write tensor data", &[WriterState::Data])?;
        let t = self
            .tensors
            .get(self.next)
            .ok_or_else(|| WriterError::OutOfOrder {
                expected: "(no more tensors)".into(),
                got: name.to_string(),
            })?;
        if t.name != name {
            return Err(WriterError::OutOfOrder {
                expected: t.name.clone(),
                got: name.to_string(),
            });
        }
        if bytes.len() as u64 != t.n_bytes() {
            return Err(WriterError::Size {
                name: name.to_string(),
                ty: t.ty,
                got: bytes.len(),
                want: t.n_bytes(),
            });
        }
        let pad = t.offset - self.written;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.out.write_all(bytes)?;
        self.written = t.offset + t.n_bytes();
        self.next += 1;
        Ok(())
    }

    /// Pads the data section to the alignment (as gguf-py does), flushes and
    /// returns the output.
    pub fn finish(mut self) -> Result<W, WriterError> {
        self.expect("finish", &[WriterState::Data])?;
        if self.next != self.tensors.len() {
            return Err(WriterError::Incomplete {
                missing: self.tensors.len() - self.next,
            });
        }
        let end = self.written.div_ceil(self.alignment) * self.alignment;
        self.out
            .write_all(&vec![0u8; (end - self.written) as usize])?;
        self.out.flush()?;
        self.state = WriterState::Done;
        Ok(self.out)
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    buf.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            buf.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            macro_rules! each {
                ($v:expr) => {
                    for x in $v {
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                };
            }
            match a {
                Array::U8(v) => buf.extend_from_slice(v),
                Array::I8(v) => buf.extend(v.iter().map(|&x| x as u8)),
                Array::U16(v) => each!(v),
                Array::I16(v) => each!(v),
                Array::U32(v) => each!(v),
                Array::I32(v) => each!(v),
                Array::F32(v) => each!(v),
                Array::Bool(v) => buf.extend(v.iter().map(|&x| x as u8)),
                Array::String(v) => {
                    for s in v {
                        put_str(buf, s);
                    }
                }
                Array::U64(v) => each!(v),
                Array::I64(v) => each!(v),
                Array::F64(v) => each!(v),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::reader::Header;

    #[test]
    fn writes_what_the_reader_reads_back() {
        let mut w = GgufWriter::new(Vec::new());
        w.add_kv("general.architecture", Value::String("llama".into()))
            .unwrap();
        w.add_kv(
            "a.list",
            Value::Array(Array::String(vec!["x".into(), "yz".into()])),
        )
        .unwrap();
        w.add_kv("a.ints", Value::Array(Array::I32(vec![1, -2, 3])))
            .unwrap();
        w.add_kv("a.flag", Value::Bool(true)).unwrap();
        assert!(matches!(
            w.add_kv("a.flag", Value::Bool(false)),
            Err(WriterError::DuplicateKey(_))
        ));
        w.add_tensor("w", &[32, 3], GgmlType::Q8_0).unwrap();
        w.add_tensor("b", &[5], GgmlType::F32).unwrap();
        assert!(matches!(
            w.add_kv("late", Value::U8(1)),
            Err(WriterError::WrongState { .. })
        ));
        assert!(matches!(
            w.write_tensor("w", &[0; 102]),
            Err(WriterError::WrongState { .. })
        ));
        w.write_header().unwrap();
        assert!(matches!(
            w.write_tensor("b", &[0; 20]),
            Err(WriterError::OutOfOrder { .. })
        ));
        assert!(matches!(
            w.write_tensor("w", &[0; 10]),
            Err(WriterError::Size { .. })
        ));
        w.write_tensor("w", &[1; 102]).unwrap();
        w.write_tensor("b", &[2; 20]).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 32, 0);
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(
            h.get("a.ints"),
            Some(&Value::Array(Array::I32(vec![1, -2, 3])))
        );
        assert_eq!(h.get("a.flag"), Some(&Value::Bool(true)));
        assert_eq!(h.tensors[1].offset, 128);
        let start = (h.data_offset + h.tensors[1].offset) as usize;
        assert_eq!(&bytes[start..start + 20], &[2; 20]);
    }

    #[test]
    fn unfinished_data_is_an_error() {
        let mut w = GgufWriter::new(Vec::new());
        w.add_tensor("w", &[4], GgmlType::F32).unwrap();
        assert!(matches!(
            w.add_tensor("v", &[4, 1, 1, 1, 1], GgmlType::F32),
            Err(WriterError::BadTensor { .. })
        ));
        w.write_header().unwrap();
        assert!(matches!(
            w.finish(),
            Err(WriterError::Incomplete { missing: 1 })
        ));
    }
}
