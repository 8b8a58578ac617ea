//! Safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; a tensor is copied
//! once, straight from the mapping into a tensor of the requested dtype and
//! device, so the model is never held twice in RAM.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};
use tch::{Device, Kind, Tensor};

use super::ModelError;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; qcoder never writes to a checkpoint
        // it is reading. A file truncated by another process underneath us is
        // the usual mmap caveat, which every safetensors reader shares.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|source| ModelError::Safetensors {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }

    /// Drops this process's mapping of `bytes` (a slice of this file) once
    /// they have been copied: the pages stay in the page cache, but no
    /// longer count in this process's memory, so loading a model peaks at
    /// its tensors' size instead of twice that. Re-reading them maps the
    /// pages again (the mapping is read-only and backed by the file).
    fn release(&self, bytes: &[u8]) {
        let base = self.mmap.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        if bytes.is_empty() || start < base || start + bytes.len() > base + self.mmap.len() {
            return;
        }
        #[cfg(unix)]
        // SAFETY: no reference into the range is used after this call (the
        // caller copied the bytes out); a later read of the range faults the
        // file's pages in again. Advice only: failure changes nothing.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start - base,
                bytes.len(),
            );
        }
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let (start, end) = info.data_offsets;
        // `read_metadata` validated that the offsets tile the data section.
        &self.mmap[self.data_start + start..self.data_start + end]
    }
}

/// A checkpoint: every tensor name mapped to the file that holds it.
pub struct Checkpoint {
    root: PathBuf,
    files: Vec<MappedFile>,
    /// Sorted so listings are stable.
    names: BTreeMap<String, usize>,
}

/// A tensor's description without its data.
#[derive(Debug, Clone)]
pub struct TensorMeta<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub file: &'a Path,
}

impl Checkpoint {
    /// Opens the weights of a model directory.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.is_file() {
            Self::open_index(dir, &index)
        } else if single.is_file() {
            Self::open_files(dir, &[single])
        } else {
            Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Opens a directory or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            Self::open_dir(path)
        } else {
            let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            Self::open_files(&root, &[path.to_path_buf()])
        }
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::ShardIndex {
            path: index.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut shards: Vec<String> = Vec::new();
        let mut expected: HashMap<&str, &str> = HashMap::new();
        for (name, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map.{name}` is not a file name")))?;
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(bad(format!(
                    "shard name `{shard}` is not a plain file name"
                )));
            }
            if !shards.iter().any(|s| s == shard) {
                shards.push(shard.to_string());
            }
            expected.insert(name, shard);
        }
        shards.sort();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let ckpt = Self::open_files(dir, &paths)?;
        for (name, shard) in expected {
            match ckpt.names.get(name) {
                Some(&i) if ckpt.files[i].path.file_name() == Some(shard.as_ref()) => {}
                _ => {
                    return Err(bad(format!(
                        "lists tensor `{name}` in {shard}, but that file does not contain it"
                    )))
                }
            }
        }
        Ok(ckpt)
    }

    fn open_files(root: &Path, paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut names = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = MappedFile::open(path)?;
            for name in file.metadata.offset_keys() {
                if let Some(prev) = names.insert(name.clone(), i) {
                    let prev: &MappedFile = &files[prev];
                    return Err(ModelError::ShardIndex {
                        path: path.clone(),
                        msg: format!("tensor `{name}` is also stored in {}", prev.path.display()),
                    });
                }
            }
            files.push(file);
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            names,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = TensorMeta<'_>> {
        self.names.iter().filter_map(|(name, &i)| {
            let file = &self.files[i];
            file.metadata.info(name).map(|info| TensorMeta {
                name,
                dtype: info.dtype,
                shape: &info.shape,
                file: &file.path,
            })
        })
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta<'_>> {
        let (name, &i) = self.names.get_key_value(name)?;
        let file = &self.files[i];
        let info = file.metadata.info(name)?;
        Some(TensorMeta {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            file: &file.path,
        })
    }

    /// Raw little-endian bytes of a tensor, straight from the mapping.
    pub fn raw(&self, name: &str) -> Result<(TensorMeta<'_>, &[u8]), ModelError> {
        let (key, &i) = self
            .names
            .get_key_value(name)
            .ok_or_else(|| self.missing(name))?;
        let file = &self.files[i];
        let info = file.metadata.info(key).ok_or_else(|| self.missing(name))?;
        let meta = TensorMeta {
            name: key,
            dtype: info.dtype,
            shape: &info.shape,
            file: &file.path,
        };
        Ok((meta, file.bytes(info)))
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.root.clone(),
        }
    }

    /// Loads a tensor, checking its shape against `expected`, converted to
    /// `kind` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        expected: &[i64],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, ModelError> {
        let (meta, bytes) = self.raw(name)?;
        let shape: Vec<i64> = meta.shape.iter().map(|&d| d as i64).collect();
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                path: meta.file.to_path_buf(),
                expected: expected.to_vec(),
                got: shape,
            });
        }
        let t = self.load_bytes(&meta, bytes, kind, device)?;
        self.release(name, bytes);
        Ok(t)
    }

    /// Loads a tensor whatever its shape.
    pub fn tensor_any_shape(
        &self,
        name: &str,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, ModelError> {
        let (meta, bytes) = self.raw(name)?;
        let t = self.load_bytes(&meta, bytes, kind, device)?;
        self.release(name, bytes);
        Ok(t)
    }

    /// See [`MappedFile::release`]: after a tensor's bytes were copied.
    fn release(&self, name: &str, bytes: &[u8]) {
        if let Some(&i) = self.names.get(name) {
            self.files[i].release(bytes);
        }
    }

    fn load_bytes(
        &self,
        meta: &TensorMeta<'_>,
        bytes: &[u8],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, ModelError> {
        let src_kind = kind_of(meta.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: meta.name.to_string(),
            path: meta.file.to_path_buf(),
            dtype: format!("{:?}", meta.dtype),
        })?;
        let shape: Vec<i64> = meta.shape.iter().map(|&d| d as i64).collect();
        let elt = src_kind.elt_size_in_bytes();
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(elt);
        let src = if aligned && !bytes.is_empty() {
            // SAFETY: `bytes` lives in the mapping, which outlives `src`; `src`
            // is only read, and the `copy = true` conversion below detaches the
            // result from the mapping before `src` is dropped.
            unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], src_kind, Device::Cpu)? }
        } else {
            Tensor::f_from_data_size(bytes, &shape, src_kind)?
        };
        Ok(src.f_to_device_(device, kind, false, true)?)
    }
}

/// The libtorch kind of a safetensors dtype, for the dtypes qcoder loads.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Short lower-case dtype names, as HF and `inspect` print them.
pub fn dtype_name(dtype: Dtype) -> String {
    match dtype {
        Dtype::F32 => "f32".into(),
        Dtype::F16 => "f16".into(),
        Dtype::BF16 => "bf16".into(),
        Dtype::F64 => "f64".into(),
        Dtype::I64 => "i64".into(),
        Dtype::I32 => "i32".into(),
        Dtype::I16 => "i16".into(),
        Dtype::I8 => "i8".into(),
        Dtype::U8 => "u8".into(),
        Dtype::BOOL => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A tensor's bytes held for writing.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// Copies a libtorch tensor (any device) into little-endian bytes.
    pub fn from_tensor(t: &Tensor) -> Result<Self, ModelError> {
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Double => Dtype::F64,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Int16 => Dtype::I16,
            Kind::Int8 => Dtype::I8,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::BOOL,
            other => {
                return Err(ModelError::Torch(tch::TchError::Kind(format!(
                    "cannot store a {other:?} tensor in safetensors"
                ))))
            }
        };
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        Ok(Self {
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data,
        })
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes a checkpoint as HF does: `model.safetensors`, or shards
/// `model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json` when
/// it exceeds `max_shard_bytes`. Tensors are buffered only up to one shard;
/// shards get their final names in `finish`, so a directory never holds a
/// half-written checkpoint under final names.
pub struct ShardedWriter {
    dir: PathBuf,
    max_shard_bytes: u64,
    pending: Vec<(String, OwnedTensor)>,
    pending_bytes: u64,
    /// Temporary file name and tensor names of each written shard.
    shards: Vec<(PathBuf, Vec<String>)>,
    total_bytes: u64,
}

impl ShardedWriter {
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            pending: Vec::new(),
            pending_bytes: 0,
            shards: Vec::new(),
            total_bytes: 0,
        }
    }

    pub fn add(&mut self, name: impl Into<String>, tensor: &Tensor) -> Result<(), ModelError> {
        let owned = OwnedTensor::from_tensor(tensor)?;
        let bytes = owned.data.len() as u64;
        if self.pending_bytes > 0 && self.pending_bytes + bytes > self.max_shard_bytes {
            self.flush()?;
        }
        self.pending_bytes += bytes;
        self.total_bytes += bytes;
        self.pending.push((name.into(), owned));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ModelError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!(".shard-{}.tmp", self.shards.len()));
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let views: Vec<(&str, &OwnedTensor)> =
            self.pending.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|source| {
            ModelError::Safetensors {
                path: path.clone(),
                source,
            }
        })?;
        let names = self.pending.drain(..).map(|(n, _)| n).collect();
        self.shards.push((path, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Writes the last shard, gives all shards their final names and writes
    /// the index when there is more than one. Returns the files written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, ModelError> {
        self.flush()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let n = self.shards.len();
        if n <= 1 {
            let target = self.dir.join(SINGLE_FILE);
            if let Some((tmp, _)) = self.shards.first() {
                std::fs::rename(tmp, &target).map_err(io(&target))?;
            } else {
                let metadata =
                    std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
                safetensors::serialize_to_file(
                    Vec::<(&str, &OwnedTensor)>::new(),
                    Some(metadata),
                    &target,
                )
                .map_err(|source| ModelError::Safetensors {
                    path: target.clone(),
                    source,
                })?;
            }
            return Ok(vec![target]);
        }
        let mut weight_map = serde_json::Map::new();
        let mut files = Vec::with_capacity(n);
        for (k, (tmp, names)) in self.shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
            let target = self.dir.join(&file);
            std::fs::rename(tmp, &target).map_err(io(&target))?;
            for name in names {
                weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            }
            files.push(target);
        }
        let index = serde_json::json!({
            "metadata": { "total_size": self.total_bytes },
            "weight_map": weight_map,
        });
        let path = self.dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("JSON of strings and numbers");
        std::fs::write(&path, text).map_err(io(&path))?;
        files.push(path);
        Ok(files)
    }
}
