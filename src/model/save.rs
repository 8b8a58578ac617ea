//! Writing safetensors checkpoints tensor by tensor, so a model is never held
//! whole in memory: the header (names, dtypes, shapes, offsets) is known up
//! front, then each tensor's bytes are streamed in order. Sharded checkpoints
//! follow transformers' layout (`model-00001-of-00003.safetensors` plus
//! `model.safetensors.index.json`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("writing {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: expected tensor `{expected}` next, got `{got}`", path.display())]
    Order {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("{}: tensor `{name}` has {got} bytes, its header entry says {want}", path.display())]
    Size {
        path: PathBuf,
        name: String,
        got: usize,
        want: usize,
    },
    #[error("{}: {missing} tensors were never written", path.display())]
    Incomplete { path: PathBuf, missing: usize },
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn n_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// A safetensors file being written; tensors must come in `specs` order.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl SafetensorsWriter {
    pub fn create(path: &Path, specs: Vec<TensorSpec>) -> Result<Self, SaveError> {
        let io = |error| SaveError::Io {
            path: path.to_path_buf(),
            error,
        };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for s in &specs {
            let end = offset + s.n_bytes();
            header.insert(
                s.name.clone(),
                json!({"dtype": dtype_str(s.dtype), "shape": s.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut text = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
        // The data section starts 8-byte aligned (the safetensors spec pads
        // the header with spaces).
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&text).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            specs,
            next: 0,
        })
    }

    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), SaveError> {
        let spec = self.specs.get(self.next).ok_or_else(|| SaveError::Order {
            path: self.path.clone(),
            expected: "(none)".into(),
            got: name.into(),
        })?;
        if spec.name != name {
            return Err(SaveError::Order {
                path: self.path.clone(),
                expected: spec.name.clone(),
                got: name.into(),
            });
        }
        if spec.n_bytes() != bytes.len() {
            return Err(SaveError::Size {
                path: self.path.clone(),
                name: name.into(),
                got: bytes.len(),
                want: spec.n_bytes(),
            });
        }
        self.out.write_all(bytes).map_err(|error| SaveError::Io {
            path: self.path.clone(),
            error,
        })?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), SaveError> {
        if self.next != self.specs.len() {
            return Err(SaveError::Incomplete {
                path: self.path.clone(),
                missing: self.specs.len() - self.next,
            });
        }
        let io = |error| SaveError::Io {
            path: self.path.clone(),
            error,
        };
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)
    }
}

fn dtype_str(d: Dtype) -> String {
    format!("{d:?}")
}

/// f32 values as little-endian bytes of `dtype` (F32, BF16 or F16, rounding
/// to nearest even as torch does).
pub fn f32_to_bytes(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Little-endian F32/BF16/F16 bytes as f32 values (`None` for other dtypes).
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Splits tensors (in order) into shards of at most `max_bytes` each (a
/// tensor larger than the limit gets a shard of its own), as transformers'
/// `save_pretrained(max_shard_size=...)` does.
pub fn plan_shards(specs: &[TensorSpec], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let n = s.n_bytes() as u64;
        if !current.is_empty() && size + n > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += n;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// `model-00001-of-00003.safetensors` (or `model.safetensors` for one shard).
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        super::weights::SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

/// `model.safetensors.index.json`: total size and which shard holds which tensor.
pub fn shard_index(specs: &[TensorSpec], shards: &[Vec<usize>]) -> serde_json::Value {
    let total: usize = specs.iter().map(TensorSpec::n_bytes).sum();
    let mut map = BTreeMap::new();
    for (k, shard) in shards.iter().enumerate() {
        for &i in shard {
            map.insert(specs[i].name.clone(), shard_file_name(k, shards.len()));
        }
    }
    json!({"metadata": {"total_size": total}, "weight_map": map})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Checkpoint;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "b".into(),
                dtype: Dtype::BF16,
                shape: vec![3],
            },
        ];
        let mut w = SafetensorsWriter::create(&path, specs).unwrap();
        assert!(matches!(
            w.write("b", &[0; 6]),
            Err(SaveError::Order { .. })
        ));
        w.write("a", &f32_to_bytes(&a, Dtype::F32)).unwrap();
        w.write("b", &f32_to_bytes(&[1.0, 2.0, 3.0], Dtype::BF16))
            .unwrap();
        w.finish().unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let (meta, bytes) = ckpt.raw("a").unwrap();
        assert_eq!(meta.shape, &[2, 3]);
        assert_eq!(bytes_to_f32(bytes, meta.dtype).unwrap(), a);
        let (meta, bytes) = ckpt.raw("b").unwrap();
        assert_eq!(
            bytes_to_f32(bytes, meta.dtype).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn shards_respect_the_limit() {
        let spec = |n: usize| TensorSpec {
            name: format!("t{n}"),
            dtype: Dtype::F32,
            shape: vec![n],
        };
        let specs = vec![spec(10), spec(10), spec(30), spec(5)];
        assert_eq!(plan_shards(&specs, 80), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&specs, 1000), vec![vec![0, 1, 2, 3]]);
        assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
    }
}
