//! The decoder of every supported architecture, in one file: Qwen2 (q/k/v
//! bias), Qwen3 (per-head RMSNorm on q and k) and Llama/Mistral differ only in
//! switches read from the config. The struct tree mirrors the HF weight names
//! (`model.layers.{i}.self_attn.q_proj.weight`), and the numerics follow
//! transformers' `modeling_qwen2.py` / `modeling_qwen3.py` /
//! `modeling_llama.py` operation for operation, so f32 logits agree to ~1e-6.

use tch::{Device, Kind, Tensor};

use super::config::{Architecture, ModelConfig, Rope, RopeScaling};
use super::linear::{matvec_stacked, DenseLinear, Linear};
use super::weights::Checkpoint;
use super::ModelError;
use crate::quant::checkpoint::{read_linear, QuantFormat};
use crate::quant::QuantizedLinear;
use crate::team::Team;

/// Where and in which dtype the weights live.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    pub kind: Kind,
}

/// Builds weight paths the way the HF module tree names them.
struct Loader<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    opts: LoadOptions,
    /// Set for GPTQ/AWQ checkpoints: linears stored as `qweight` etc.
    quant: Option<QuantFormat>,
    /// What a quantized linear becomes.
    layers: &'a dyn QuantizedLayers,
}

/// How the linears of a quantized checkpoint become layers: dequantized to
/// dense weights (`Dequantize`, the default), or kept as integers on fast
/// kernels (`infer::quantized::FastPath`).
pub trait QuantizedLayers: Sync {
    fn build(
        &self,
        name: &str,
        q: QuantizedLinear,
        opts: LoadOptions,
    ) -> Result<Box<dyn Linear>, ModelError>;
}

/// Dense weights from the integers, once at load.
pub struct Dequantize;

impl QuantizedLayers for Dequantize {
    fn build(
        &self,
        _name: &str,
        q: QuantizedLinear,
        opts: LoadOptions,
    ) -> Result<Box<dyn Linear>, ModelError> {
        let weight = q
            .dequantize()
            .f_to_device_(opts.device, opts.kind, false, false)?;
        let bias = match &q.bias {
            Some(b) => Some(b.f_to_device_(opts.device, opts.kind, false, false)?),
            None => None,
        };
        Ok(Box::new(DenseLinear::new(weight, bias)))
    }
}

impl<'a> Loader<'a> {
    fn pp(&self, name: impl std::fmt::Display) -> Loader<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Loader {
            ckpt: self.ckpt,
            prefix,
            opts: self.opts,
            quant: self.quant,
            layers: self.layers,
        }
    }

    fn name(&self, leaf: &str) -> String {
        format!("{}.{leaf}", self.prefix)
    }

    fn get(&self, leaf: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        self.ckpt
            .tensor(&self.name(leaf), shape, self.opts.kind, self.opts.device)
    }

    fn linear(&self, in_f: usize, out_f: usize, bias: bool) -> Result<Box<dyn Linear>, ModelError> {
        if self.ckpt.contains(&self.name("qweight")) {
            let format = self.quant.ok_or_else(|| ModelError::Config {
                path: self.ckpt.root().join("config.json"),
                msg: format!(
                    "`{}` is quantized, but config.json has no `quantization_config`",
                    self.prefix
                ),
            })?;
            let q = read_linear(self.ckpt, &self.prefix, format, in_f, out_f, bias)?;
            return self.layers.build(&self.prefix, q, self.opts);
        }
        let (in_f, out_f) = (in_f as i64, out_f as i64);
        let weight = self.get("weight", &[out_f, in_f])?;
        let bias = if bias {
            Some(self.get("bias", &[out_f])?)
        } else {
            None
        };
        Ok(Box::new(DenseLinear::new(weight, bias)))
    }

    fn rms_norm(&self, size: usize, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm {
            weight: self.get("weight", &[size as i64])?,
            eps,
        })
    }
}

/// `LlamaRMSNorm` / `Qwen2RMSNorm`: normalise in f32, scale in the input dtype.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let variance = h.square().mean_dim(-1, true, Kind::Float);
        let h = h * (variance + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

/// A contiguous f32 CPU tensor's elements, in place.
fn cpu_f32(t: &Tensor) -> Option<&[f32]> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    // SAFETY: contiguous f32 storage of `n` elements, alive as long as `t`.
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) })
}

/// As [`cpu_f32`], writable. Panics unless `t` is a contiguous f32 CPU tensor.
///
/// # Safety
/// No other reference to `t`'s elements may be used while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn cpu_f32_mut(t: &Tensor) -> &mut [f32] {
    assert!(t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

/// `RmsNorm::forward` of one vector (f32).
fn rms_norm_into(x: &[f32], norm: &RmsNorm, out: &mut [f32]) {
    let inv = rms_inverse(x, norm);
    let weight = cpu_f32(&norm.weight).expect("checked by can_decode_one");
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// `rms_norm_into` with `x` as the output (the Qwen3 q/k norms, per head).
fn rms_norm_in_place(x: &mut [f32], norm: &RmsNorm) {
    let inv = rms_inverse(x, norm);
    let weight = cpu_f32(&norm.weight).expect("checked by can_decode_one");
    for (v, w) in x.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// `1/√(mean(x²) + eps)`.
fn rms_inverse(x: &[f32], norm: &RmsNorm) -> f32 {
    let variance = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (variance + norm.eps as f32).sqrt()
}

/// `apply_rotary` on one head: the first `cos.len()` features rotated.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len() / 2;
    for i in 0..half {
        let (x1, x2) = (head[i], head[half + i]);
        head[i] = x1 * cos[i] - x2 * sin[i];
        head[half + i] = x2 * cos[half + i] + x1 * sin[half + i];
    }
}

/// Dot product in eight lanes (vectorised by the compiler).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The working vectors of a batch-1 decode step (`decode_one`), made once
/// per step and reused by every layer.
#[derive(Default)]
struct StepBuffers {
    /// The normed residual stream, input of q/k/v and of gate/up.
    h: Vec<f32>,
    /// q, k and v one after another.
    qkv: Vec<f32>,
    attn: Vec<f32>,
    /// o_proj's and down_proj's outputs.
    o: Vec<f32>,
    /// gate then up.
    gate_up: Vec<f32>,
}

/// One query head's attention over its cached keys and values (rows of
/// `head_dim`): softmax(q·kᵀ·scale)·v into `out`; `scores` has a slot per key.
/// Compiled twice: with AVX2+FMA where the CPU has them (the crate is built
/// for baseline x86-64, whose SSE2 code ran these loops at a quarter of the
/// width), else as is.
fn attend_one(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[inline(always)]
    fn body(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let head_dim = q.len();
        for (s, key) in scores.iter_mut().zip(keys.chunks_exact(head_dim)) {
            *s = dot(q, key) * scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut total = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        out.fill(0.0);
        for (s, value) in scores.iter().zip(values.chunks_exact(head_dim)) {
            let p = s / total;
            for (o, v) in out.iter_mut().zip(value) {
                *o += p * v;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(
            q: &[f32],
            keys: &[f32],
            values: &[f32],
            scale: f32,
            scores: &mut [f32],
            out: &mut [f32],
        ) {
            body(q, keys, values, scale, scores, out)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { wide(q, keys, values, scale, scores, out) };
        }
    }
    body(q, keys, values, scale, scores, out)
}

/// Rotary position embedding, with the frequency schedules of transformers'
/// `modeling_rope_utils.py` (default, linear, llama3, yarn) computed in f32
/// the same way.
#[derive(Debug)]
struct Rotary {
    /// (dim / 2), f32
    inv_freq: Tensor,
    /// YaRN's cos/sin multiplier (1 otherwise).
    attention_scaling: f64,
}

impl Rotary {
    fn new(rope: &Rope, device: Device) -> Self {
        let dim = rope.dim as i64;
        let f32_cpu = (Kind::Float, Device::Cpu);
        // base ** (arange(0, dim, 2) / dim), as transformers writes it.
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / dim as f64;
        let pos_freqs = Tensor::pow_scalar(rope.theta, &exponents);
        let default = pos_freqs.reciprocal();
        let (inv_freq, attention_scaling) = match &rope.scaling {
            RopeScaling::Default => (default, 1.0),
            RopeScaling::Linear { factor } => (default / *factor, 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                let wavelen = default.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled =
                    default.where_self(&wavelen.le(low_freq_wavelen), &(&default / *factor));
                let smooth = (wavelen.reciprocal() * *old_len - *low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &scaled / *factor + &smooth * &scaled;
                let medium = wavelen
                    .ge(high_freq_wavelen)
                    .logical_and(&wavelen.le(low_freq_wavelen));
                (smoothed.where_self(&medium, &scaled), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let base = rope.theta;
                let d = dim as f64;
                let correction_dim = |rotations: f64| {
                    d * (original_max_position_embeddings
                        / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001;
                }
                let ramp =
                    ((Tensor::arange(dim / 2, f32_cpu) - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let extrapolation = pos_freqs.reciprocal();
                let interpolation = (pos_freqs * *factor).reciprocal();
                let inv_freq = interpolation * (1.0 - &extrapolation_factor)
                    + extrapolation * &extrapolation_factor;
                (inv_freq, *attention_factor)
            }
        };
        Self {
            inv_freq: inv_freq.to_device(device),
            attention_scaling,
        }
    }

    /// cos and sin for `positions` (batch, seq), shaped (batch, 1, seq, dim) to
    /// broadcast over heads.
    fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (mut cos, mut sin) = (emb.cos(), emb.sin());
        if self.attention_scaling != 1.0 {
            cos *= self.attention_scaling;
            sin *= self.attention_scaling;
        }
        (
            cos.to_kind(kind).unsqueeze(1),
            sin.to_kind(kind).unsqueeze(1),
        )
    }
}

/// `x * cos + rotate_half(x) * sin` on the first `dim` features of each head,
/// where `dim` is the width of `cos` (partial rotary leaves the rest as is).
/// x: (batch, heads, seq, head_dim); cos, sin: (batch, 1, seq, dim)
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let head_dim = x.size()[3];
    let dim = cos.size()[3];
    let (rot, pass) = if dim == head_dim {
        (x.shallow_clone(), None)
    } else {
        (x.narrow(3, 0, dim), Some(x.narrow(3, dim, head_dim - dim)))
    };
    let half = dim / 2;
    let x1 = rot.narrow(3, 0, half);
    let x2 = rot.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    let out = &rot * cos + rotated * sin;
    match pass {
        None => out,
        Some(pass) => Tensor::cat(&[&out, &pass], -1),
    }
}

/// Preallocated key/value cache: per layer (batch, n_kv_heads, capacity, head_dim).
///
/// A batch of prompts of different lengths shares one cache left-padded to
/// the longest (`CausalLm::new_padded_cache`): row `b`'s first `pads[b]`
/// positions hold padding that no real token attends to, and its tokens'
/// rotary positions start at 0 after the padding, so each row computes what
/// it would alone.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    /// Left padding per row; empty when no row is padded.
    pads: Vec<usize>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Left padding of each row (empty when no row is padded).
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }
    /// Forgets the cached tokens, keeping the allocation.
    pub fn reset(&mut self) {
        self.len = 0;
    }
    /// Drops cached tokens past `len` (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Keeps only the batch rows `rows` (indices into the current batch, in
    /// the order given), e.g. to stop computing sequences that have finished.
    /// When no kept row is padded the cache becomes unpadded, so that the
    /// one-row fast paths apply again.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<(), ModelError> {
        let Some((k0, _)) = self.layers.first() else {
            return Ok(());
        };
        let batch = k0.size()[0] as usize;
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(ModelError::Torch(tch::TchError::Torch(format!(
                "row {bad} of a cache of {batch} rows"
            ))));
        }
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::from_slice(&index).to_device(k0.device());
        for (k, v) in &mut self.layers {
            *k = k.f_index_select(0, &index)?;
            *v = v.f_index_select(0, &index)?;
        }
        if !self.pads.is_empty() {
            self.pads = rows.iter().map(|&r| self.pads[r]).collect();
            if self.pads.iter().all(|&p| p == 0) {
                self.pads.clear();
            }
        }
        Ok(())
    }

    /// Writes `k`, `v` (batch, n_kv, seq, head_dim) at the current end and
    /// returns views of everything cached so far, including them.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let seq = k.size()[2];
        let (k_cache, v_cache) = &mut self.layers[layer];
        let start = self.len as i64;
        k_cache.narrow(2, start, seq).copy_(k);
        v_cache.narrow(2, start, seq).copy_(v);
        (
            k_cache.narrow(2, 0, start + seq),
            v_cache.narrow(2, 0, start + seq),
        )
    }
}

/// How attention is masked for one forward call.
enum Mask {
    /// Every query sees every cached key (one new token, no window in reach).
    None,
    /// Plain causal prefill from position 0: SDPA's `is_causal`.
    Causal,
    /// Explicit boolean mask (1, 1, q_len, kv_len), true = attend.
    Explicit(Tensor),
}

impl Mask {
    fn build(q_len: i64, past: i64, window: Option<usize>, device: Device) -> Mask {
        let kv_len = past + q_len;
        let window_bites = window.is_some_and(|w| kv_len > w as i64);
        if !window_bites && q_len == 1 {
            return Mask::None;
        }
        if !window_bites && past == 0 {
            return Mask::Causal;
        }
        let opts = (Kind::Int64, device);
        let q_pos = Tensor::arange_start(past, kv_len, opts).unsqueeze(1);
        let k_pos = Tensor::arange(kv_len, opts).unsqueeze(0);
        let mut allowed = k_pos.le_tensor(&q_pos);
        if let Some(w) = window {
            // transformers' sliding window: key kept when q - k < window.
            allowed = allowed.logical_and(&(&q_pos - &k_pos).lt(w as i64));
        }
        Mask::Explicit(allowed.view([1, 1, q_len, kv_len]))
    }

    /// [`Mask::build`] for rows left-padded by `pads`: (batch, 1, q_len,
    /// kv_len), where no query sees a padding key. A padding query sees
    /// itself only, so that no row of the softmax is empty (its output is
    /// never read, but a NaN there would reach real rows through the
    /// cached values: 0·NaN is NaN).
    fn build_padded(
        q_len: i64,
        past: i64,
        window: Option<usize>,
        pads: &[usize],
        device: Device,
    ) -> Mask {
        let kv_len = past + q_len;
        let opts = (Kind::Int64, device);
        let q_pos = Tensor::arange_start(past, kv_len, opts).view([1, q_len, 1]);
        let k_pos = Tensor::arange(kv_len, opts).view([1, 1, kv_len]);
        let pads: Vec<i64> = pads.iter().map(|&p| p as i64).collect();
        let pad = Tensor::from_slice(&pads).to_device(device).view([-1, 1, 1]);
        let mut allowed = k_pos.le_tensor(&q_pos).logical_and(&k_pos.ge_tensor(&pad));
        if let Some(w) = window {
            allowed = allowed.logical_and(&(&q_pos - &k_pos).lt(w as i64));
        }
        let allowed = allowed.logical_or(&k_pos.eq_tensor(&q_pos));
        Mask::Explicit(allowed.unsqueeze(1))
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Box<dyn Linear>,
    pub k_proj: Box<dyn Linear>,
    pub v_proj: Box<dyn Linear>,
    pub o_proj: Box<dyn Linear>,
    /// Qwen3 only: RMSNorm over head_dim of each query / key head.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    window: Option<usize>,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        self.o_proj.forward(&self.attend(x, cos_sin, mask, cache))
    }

    /// Attention up to (not including) `o_proj`: (batch, seq, heads * head_dim).
    fn attend(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, s, _) = x.size3().expect("decoder input is (batch, seq, hidden)");
        let heads = |t: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let t = t.view([b, s, n, self.head_dim]);
            let t = match norm {
                Some(norm) => norm.forward(&t),
                None => t,
            };
            t.transpose(1, 2) // (batch, heads, seq, head_dim)
        };
        let q = heads(self.q_proj.forward(x), self.n_heads, &self.q_norm);
        let k = heads(self.k_proj.forward(x), self.n_kv_heads, &self.k_norm);
        let v = heads(self.v_proj.forward(x), self.n_kv_heads, &None);
        let (cos, sin) = cos_sin;
        let q = apply_rotary(&q, cos, sin);
        let k = apply_rotary(&k, cos, sin);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v),
            None => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let n_rep = self.n_heads / self.n_kv_heads;
        let out = if s == 1 && n_rep > 1 {
            // One new token: fold the query heads of each KV group into the
            // sequence axis, so all groups read the cache without copying it
            // (transformers' `pack_gqa`). Any mask is (1, 1, 1, kv) and
            // broadcasts over the folded axis.
            let q = q.reshape([b, self.n_kv_heads, n_rep, self.head_dim]);
            let out = sdpa(&q, &k, &v, mask, scale, false);
            out.reshape([b, self.n_heads, 1, self.head_dim])
        } else {
            let (k, v) = (repeat_kv(&k, n_rep), repeat_kv(&v, n_rep));
            sdpa(&q, &k, &v, mask, scale, true)
        };
        out.transpose(1, 2)
            .reshape([b, s, self.n_heads * self.head_dim])
    }
}

fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64, causal_ok: bool) -> Tensor {
    match mask {
        Mask::None => {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, scale, false)
        }
        Mask::Causal if causal_ok => {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, scale, false)
        }
        Mask::Causal => unreachable!("a causal prefill has more than one query"),
        Mask::Explicit(m) => {
            Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, scale, false)
        }
    }
}

/// (batch, n_kv, seq, d) -> (batch, n_kv * n_rep, seq, d), as transformers' `repeat_kv`.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let (b, n_kv, s, d) = x.size4().expect("kv is 4-d");
    x.unsqueeze(2)
        .expand([b, n_kv, n_rep, s, d], false)
        .reshape([b, n_kv * n_rep, s, d])
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Box<dyn Linear>,
    pub up_proj: Box<dyn Linear>,
    pub down_proj: Box<dyn Linear>,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&self.hidden(x))
    }

    /// `silu(gate(x)) * up(x)`: the input of `down_proj`.
    pub fn hidden(&self, x: &Tensor) -> Tensor {
        self.gate_proj.forward(x).silu() * self.up_proj.forward(x)
    }
}

/// The four distinct inputs the linears of a layer read, in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinearInput {
    /// input_layernorm(x): q_proj, k_proj, v_proj.
    Qkv,
    /// The attention output before o_proj.
    O,
    /// post_attention_layernorm(x + attn): gate_proj, up_proj.
    GateUp,
    /// silu(gate) * up: down_proj.
    Down,
}

impl LinearInput {
    /// Which input a linear (named as in `LAYER_LINEARS`) reads.
    pub fn of(name: &str) -> Option<Self> {
        Some(match name {
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => Self::Qkv,
            "self_attn.o_proj" => Self::O,
            "mlp.gate_proj" | "mlp.up_proj" => Self::GateUp,
            "mlp.down_proj" => Self::Down,
            _ => return None,
        })
    }
}

/// A forward pass through one decoder layer stopped before a linear group:
/// the residual stream so far and the input the group reads. Advancing it
/// stage by stage after each group is quantized runs the layer once in
/// total, with exactly `forward`'s operations (true-sequential calibration).
pub struct LayerWalk {
    pub at: LinearInput,
    residual: Tensor,
    value: Tensor,
    /// At `Down` when down_proj's input is recomputed: gate/up's input.
    mlp_in: Option<Tensor>,
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// Names of a layer's linears relative to `model.layers.{i}`, in the order
/// `DecoderLayer::linears_mut` yields them.
pub const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl DecoderLayer {
    /// Loads decoder layer `index` alone (layer-by-layer work such as
    /// quantization never holds the whole model).
    pub fn load(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        index: usize,
        opts: LoadOptions,
    ) -> Result<Self, ModelError> {
        Self::load_with(config, ckpt, index, opts, &Dequantize)
    }

    /// As `load`, with quantized linears built by `layers`.
    pub fn load_with(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        index: usize,
        opts: LoadOptions,
        layers: &dyn QuantizedLayers,
    ) -> Result<Self, ModelError> {
        let bad_config = |msg: String| ModelError::Config {
            path: ckpt.root().join("config.json"),
            msg,
        };
        let window = *config
            .layer_windows()
            .map_err(bad_config)?
            .get(index)
            .ok_or_else(|| bad_config(format!("there is no layer {index}")))?;
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let (n_heads, n_kv) = (config.num_attention_heads, config.n_kv_heads());
        let eps = config.rms_norm_eps;
        let root = Loader {
            ckpt,
            prefix: String::new(),
            opts,
            quant: QuantFormat::from_config(config).map_err(bad_config)?,
            layers,
        };
        let layer = root.pp("model").pp("layers").pp(index);
        let attn = layer.pp("self_attn");
        let mlp = layer.pp("mlp");
        let qk_norm = |name: &str| -> Result<Option<RmsNorm>, ModelError> {
            if config.has_qk_norm() {
                Ok(Some(attn.pp(name).rms_norm(head_dim, eps)?))
            } else {
                Ok(None)
            }
        };
        let ffn = config.intermediate_size;
        Ok(DecoderLayer {
            input_layernorm: layer.pp("input_layernorm").rms_norm(hidden, eps)?,
            self_attn: Attention {
                q_proj: attn
                    .pp("q_proj")
                    .linear(hidden, n_heads * head_dim, config.qkv_bias())?,
                k_proj: attn
                    .pp("k_proj")
                    .linear(hidden, n_kv * head_dim, config.qkv_bias())?,
                v_proj: attn
                    .pp("v_proj")
                    .linear(hidden, n_kv * head_dim, config.qkv_bias())?,
                o_proj: attn
                    .pp("o_proj")
                    .linear(n_heads * head_dim, hidden, config.o_bias())?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                n_heads: n_heads as i64,
                n_kv_heads: n_kv as i64,
                head_dim: head_dim as i64,
                window,
            },
            post_attention_layernorm: layer.pp("post_attention_layernorm").rms_norm(hidden, eps)?,
            mlp: Mlp {
                gate_proj: mlp.pp("gate_proj").linear(hidden, ffn, config.mlp_bias())?,
                up_proj: mlp.pp("up_proj").linear(hidden, ffn, config.mlp_bias())?,
                down_proj: mlp.pp("down_proj").linear(ffn, hidden, config.mlp_bias())?,
            },
        })
    }

    /// x: (batch, seq, hidden) -> (batch, seq, hidden). With a cache, `x`
    /// continues the cached sequence of layer `layer_index`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let h = self.input_layernorm.forward(x);
        let mask = ctx.mask(self.self_attn.window);
        let h = self.self_attn.forward(&h, &ctx.cos_sin, mask, cache);
        // Out of place on purpose: autograd keeps the old `x` for the norm's backward.
        let x = x + h;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x));
        &x + h
    }

    /// Whether [`DecoderLayer::decode_one`] can run this layer: every
    /// linear has a CPU matrix–vector kernel and the norms are f32 on the CPU.
    fn can_decode_one(&self) -> bool {
        let a = &self.self_attn;
        let m = &self.mlp;
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
        .iter()
        .all(|l| l.has_matvec())
            && [
                Some(&self.input_layernorm),
                Some(&self.post_attention_layernorm),
                a.q_norm.as_ref(),
                a.k_norm.as_ref(),
            ]
            .into_iter()
            .flatten()
            .all(|n| cpu_f32(&n.weight).is_some())
    }

    /// `forward` for one token of one sequence, on raw f32 slices: the same
    /// arithmetic (f32, the same op order up to the summation order inside
    /// norms and attention) without libtorch, whose ~100 small-op dispatches
    /// per layer were a quarter of a 4-bit decode step (perf). `x` is the
    /// residual stream (hidden) and is updated in place; `cos`/`sin` are the
    /// rotary tables at the cache's next position, where this token's keys
    /// and values go (the cache is f32 on the CPU, checked by the caller).
    fn decode_one(
        &self,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        cache: &mut KvCache,
        layer: usize,
        buffers: &mut StepBuffers,
    ) {
        let a = &self.self_attn;
        let (n_heads, n_kv, head_dim) = (
            a.n_heads as usize,
            a.n_kv_heads as usize,
            a.head_dim as usize,
        );
        let pos = cache.len;
        let (nq, nkv) = (n_heads * head_dim, n_kv * head_dim);
        let StepBuffers {
            h,
            qkv,
            attn,
            o,
            gate_up,
        } = buffers;
        h.resize(x.len(), 0.0);
        rms_norm_into(x, &self.input_layernorm, h);
        qkv.resize(nq + 2 * nkv, 0.0);
        matvec_stacked(&[&*a.q_proj, &*a.k_proj, &*a.v_proj], h, qkv);
        let (q, kv) = qkv.split_at_mut(nq);
        let (k, v) = kv.split_at_mut(nkv);
        for (heads, norm) in [(&mut *q, &a.q_norm), (&mut *k, &a.k_norm)] {
            for head in heads.chunks_exact_mut(head_dim) {
                if let Some(norm) = norm {
                    rms_norm_in_place(head, norm);
                }
                rotate(head, cos, sin);
            }
        }
        // The cache: (1, n_kv, capacity, head_dim) each.
        let capacity = cache.capacity;
        let (k_cache, v_cache) = &cache.layers[layer];
        // SAFETY: `forward_hidden` checked both are contiguous f32 CPU
        // tensors of this shape; nothing else touches them during the step.
        let (kc, vc) = unsafe { (cpu_f32_mut(k_cache), cpu_f32_mut(v_cache)) };
        for g in 0..n_kv {
            let at = (g * capacity + pos) * head_dim;
            kc[at..at + head_dim].copy_from_slice(&k[g * head_dim..(g + 1) * head_dim]);
            vc[at..at + head_dim].copy_from_slice(&v[g * head_dim..(g + 1) * head_dim]);
        }
        // transformers' sliding window: key kept when q - k < window.
        let first = a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let scale = (head_dim as f32).powf(-0.5);
        let n_rep = n_heads / n_kv;
        let (kc, vc, q) = (&*kc, &*vc, &*q);
        attn.resize(nq, 0.0);
        // The heads spread over the decode team: attention is the one part
        // of a step besides the products that grows with the context, and
        // the team's other threads would otherwise wait through it.
        Team::global().run_chunks_mut(attn, head_dim, &|hq, out| {
            let g = hq / n_rep;
            let span = (g * capacity + first) * head_dim..(g * capacity + pos + 1) * head_dim;
            let qh = &q[hq * head_dim..(hq + 1) * head_dim];
            let mut scores = vec![0f32; pos + 1 - first];
            attend_one(qh, &kc[span.clone()], &vc[span], scale, &mut scores, out);
        });
        o.resize(x.len(), 0.0);
        a.o_proj.matvec(attn, o);
        for (x, o) in x.iter_mut().zip(o.iter()) {
            *x += o;
        }
        rms_norm_into(x, &self.post_attention_layernorm, h);
        let m = &self.mlp;
        let ffn = m.gate_proj.out_features() as usize;
        gate_up.resize(2 * ffn, 0.0);
        matvec_stacked(&[&*m.gate_proj, &*m.up_proj], h, gate_up);
        let (gate, up) = gate_up.split_at_mut(ffn);
        for (g, u) in gate.iter_mut().zip(up.iter()) {
            // silu(g)·u
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        m.down_proj.matvec(gate, o);
        for (x, o) in x.iter_mut().zip(o.iter()) {
            *x += o;
        }
    }

    /// The attention block alone, from the residual stream: self_attn(input_layernorm(x)).
    pub fn attention_block(&self, x: &Tensor, ctx: &StepContext) -> Tensor {
        let h = self.input_layernorm.forward(x);
        self.self_attn
            .forward(&h, &ctx.cos_sin, ctx.mask(self.self_attn.window), None)
    }

    /// The inputs of the linears for residual input `x`, computed only as far
    /// as the deepest one asked for; returned in the order of `wanted`.
    pub fn linear_inputs(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        wanted: &[LinearInput],
    ) -> Vec<Tensor> {
        let deepest = wanted.iter().copied().max().unwrap_or(LinearInput::Qkv);
        let norm1 = self.input_layernorm.forward(x);
        let mut stages = vec![norm1.shallow_clone()];
        if deepest >= LinearInput::O {
            let attended =
                self.self_attn
                    .attend(&norm1, &ctx.cos_sin, ctx.mask(self.self_attn.window), None);
            stages.push(attended.shallow_clone());
            if deepest >= LinearInput::GateUp {
                let h = self
                    .post_attention_layernorm
                    .forward(&(x + self.self_attn.o_proj.forward(&attended)));
                stages.push(h.shallow_clone());
                if deepest >= LinearInput::Down {
                    stages.push(self.mlp.hidden(&h));
                }
            }
        }
        wanted
            .iter()
            .map(|w| stages[*w as usize].shallow_clone())
            .collect()
    }

    /// Starts a forward pass of residual input `x` that stops before each
    /// linear group (see [`LayerWalk`]).
    pub fn walk(&self, x: &Tensor) -> LayerWalk {
        LayerWalk {
            at: LinearInput::Qkv,
            residual: x.shallow_clone(),
            value: self.input_layernorm.forward(x),
            mlp_in: None,
        }
    }

    /// Moves `walk` to the next linear group's input with the linears as
    /// they are now. `keep_mlp_hidden = false` at `GateUp` keeps only the
    /// (narrow) input of gate/up and recomputes down_proj's wide input when
    /// asked for it.
    pub fn advance(&self, walk: &mut LayerWalk, ctx: &StepContext, keep_mlp_hidden: bool) {
        let attn = &self.self_attn;
        match walk.at {
            LinearInput::Qkv => {
                walk.value = attn.attend(&walk.value, &ctx.cos_sin, ctx.mask(attn.window), None);
                walk.at = LinearInput::O;
            }
            LinearInput::O => {
                walk.residual = &walk.residual + attn.o_proj.forward(&walk.value);
                walk.value = self.post_attention_layernorm.forward(&walk.residual);
                walk.at = LinearInput::GateUp;
            }
            LinearInput::GateUp => {
                if keep_mlp_hidden {
                    walk.value = self.mlp.hidden(&walk.value);
                } else {
                    walk.mlp_in = Some(walk.value.shallow_clone());
                }
                walk.at = LinearInput::Down;
            }
            LinearInput::Down => panic!("a layer walk past down_proj: call `finish`"),
        }
    }

    /// The input of the linear group `walk` stands at.
    pub fn walk_input(&self, walk: &LayerWalk) -> Tensor {
        match &walk.mlp_in {
            Some(h) => self.mlp.hidden(h),
            None => walk.value.shallow_clone(),
        }
    }

    /// The layer's output: `walk` must stand at down_proj.
    pub fn finish(&self, walk: LayerWalk) -> Tensor {
        assert_eq!(
            walk.at,
            LinearInput::Down,
            "finish a layer walk at down_proj"
        );
        &walk.residual + self.mlp.down_proj.forward(&self.walk_input(&walk))
    }

    /// The seven linears, named as in `LAYER_LINEARS`.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Box<dyn Linear>); 7] {
        let a = &mut self.self_attn;
        let m = &mut self.mlp;
        [
            (LAYER_LINEARS[0], &mut a.q_proj),
            (LAYER_LINEARS[1], &mut a.k_proj),
            (LAYER_LINEARS[2], &mut a.v_proj),
            (LAYER_LINEARS[3], &mut a.o_proj),
            (LAYER_LINEARS[4], &mut m.gate_proj),
            (LAYER_LINEARS[5], &mut m.up_proj),
            (LAYER_LINEARS[6], &mut m.down_proj),
        ]
    }
}

/// What all layers of one forward call share: rotary cos/sin of the positions
/// and the attention mask of each distinct window.
pub struct StepContext {
    cos_sin: (Tensor, Tensor),
    masks: Vec<(Option<usize>, Mask)>,
}

impl StepContext {
    fn mask(&self, window: Option<usize>) -> &Mask {
        &self
            .masks
            .iter()
            .find(|(w, _)| *w == window)
            .expect("StepContext built for every window of the model")
            .1
    }
}

/// The position machinery of a model (rotary tables and sliding windows),
/// for callers that run layers one at a time.
#[derive(Debug)]
pub struct Positional {
    rotary: Rotary,
    windows: Vec<Option<usize>>,
    opts: LoadOptions,
}

impl Positional {
    pub fn new(
        config: &ModelConfig,
        config_path: &std::path::Path,
        opts: LoadOptions,
    ) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Config {
            path: config_path.to_path_buf(),
            msg,
        };
        let rope = config.rope().map_err(bad)?;
        Ok(Self {
            rotary: Rotary::new(&rope, opts.device),
            windows: config.layer_windows().map_err(bad)?,
            opts,
        })
    }

    /// [`Positional::context`] for rows left-padded by `pads` (one per row):
    /// row `b`'s position `p` is at rotary position `p − pads[b]` (padding
    /// at 0), and no real token attends to padding.
    fn context_padded(&self, seq: i64, past: i64, pads: &[usize]) -> StepContext {
        let device = self.opts.device;
        let pad: Vec<i64> = pads.iter().map(|&p| p as i64).collect();
        let positions = (Tensor::arange_start(past, past + seq, (Kind::Int64, device))
            .unsqueeze(0)
            - Tensor::from_slice(&pad).to_device(device).unsqueeze(1))
        .clamp_min(0);
        let (cos, sin) = self.rotary.cos_sin(&positions, self.opts.kind);
        let mut masks: Vec<(Option<usize>, Mask)> = Vec::new();
        for &window in &self.windows {
            if !masks.iter().any(|(w, _)| *w == window) {
                let mask = Mask::build_padded(seq, past, window, pads, device);
                masks.push((window, mask));
            }
        }
        StepContext {
            cos_sin: (cos, sin),
            masks,
        }
    }

    /// Context for `seq` new positions after `past` cached ones, for `batch` rows.
    pub fn context(&self, batch: i64, seq: i64, past: i64) -> StepContext {
        let device = self.opts.device;
        let positions = Tensor::arange_start(past, past + seq, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([batch, seq], false);
        let (cos, sin) = self.rotary.cos_sin(&positions, self.opts.kind);
        let mut masks: Vec<(Option<usize>, Mask)> = Vec::new();
        for &window in &self.windows {
            if !masks.iter().any(|(w, _)| *w == window) {
                masks.push((window, Mask::build(seq, past, window, device)));
            }
        }
        StepContext {
            cos_sin: (cos, sin),
            masks,
        }
    }
}

/// A decoder-only causal LM (`*ForCausalLM`).
pub struct CausalLm {
    config: ModelConfig,
    arch: Architecture,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Box<dyn Linear>,
    positional: Positional,
    opts: LoadOptions,
    /// Decode steps run libtorch on one thread: the model's large products
    /// run on qcoder's own CPU kernels (rayon), and libtorch's OpenMP
    /// workers spinning between its small ops would take their cores.
    pub own_cpu_kernels: bool,
}

impl CausalLm {
    /// Builds the model from a checkpoint, checking every tensor's shape
    /// against the config.
    pub fn load(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        opts: LoadOptions,
    ) -> Result<Self, ModelError> {
        Self::load_with(config, ckpt, opts, &Dequantize)
    }

    /// As `load`, with quantized linears built by `layers`.
    pub fn load_with(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        opts: LoadOptions,
        layers: &dyn QuantizedLayers,
    ) -> Result<Self, ModelError> {
        let arch = config.architecture()?;
        let bad_config = |msg: String| ModelError::Config {
            path: ckpt.root().join("config.json"),
            msg,
        };
        config.validate().map_err(bad_config)?;
        let hidden = config.hidden_size;
        let eps = config.rms_norm_eps;
        let root = Loader {
            ckpt,
            prefix: String::new(),
            opts,
            quant: QuantFormat::from_config(config).map_err(bad_config)?,
            layers,
        };
        let model = root.pp("model");
        let embed_tokens = model
            .pp("embed_tokens")
            .get("weight", &[config.vocab_size as i64, hidden as i64])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load_with(config, ckpt, i, opts, layers))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = model.pp("norm").rms_norm(hidden, eps)?;
        let lm_head: Box<dyn Linear> = if config.tie_word_embeddings() {
            Box::new(DenseLinear::new(embed_tokens.shallow_clone(), None))
        } else {
            root.pp("lm_head")
                .linear(hidden, config.vocab_size, false)?
        };
        Ok(Self {
            config: config.clone(),
            arch,
            embed_tokens,
            layers,
            norm,
            lm_head,
            positional: Positional::new(config, &ckpt.root().join("config.json"), opts)?,
            opts,
            own_cpu_kernels: false,
        })
    }

    pub fn positional(&self) -> &Positional {
        &self.positional
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn architecture(&self) -> Architecture {
        self.arch
    }
    pub fn device(&self) -> Device {
        self.opts.device
    }
    pub fn kind(&self) -> Kind {
        self.opts.kind
    }
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// A cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache, ModelError> {
        let shape = [
            batch as i64,
            self.config.n_kv_heads() as i64,
            capacity as i64,
            self.config.head_dim() as i64,
        ];
        let alloc = || Tensor::f_zeros(shape, (self.opts.kind, self.opts.device));
        let layers = (0..self.layers.len())
            .map(|_| Ok((alloc()?, alloc()?)))
            .collect::<Result<Vec<_>, tch::TchError>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            pads: Vec::new(),
        })
    }

    /// A cache for one left-padded batch: row `b` starts with `pads[b]`
    /// positions of padding (see [`KvCache`]).
    pub fn new_padded_cache(&self, pads: &[usize], capacity: usize) -> Result<KvCache, ModelError> {
        let mut cache = self.new_cache(pads.len(), capacity)?;
        if pads.iter().any(|&p| p > 0) {
            cache.pads = pads.to_vec();
        }
        Ok(cache)
    }

    /// Hidden states after the final norm, (batch, seq, hidden). With a cache,
    /// `input_ids` continue the cached sequence and are appended to it.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let (b, s) = input_ids.size2()?;
        let past = cache.as_ref().map_or(0, |c| c.len) as i64;
        let end = (past + s) as usize;
        if end > self.max_positions() {
            return Err(ModelError::TooLong {
                what: "the sequence",
                len: end,
                max: self.max_positions(),
            });
        }
        if let Some(cache) = &cache {
            if end > cache.capacity {
                return Err(ModelError::TooLong {
                    what: "the sequence",
                    len: end,
                    max: cache.capacity,
                });
            }
        }
        if let Some(cache) = cache.as_deref_mut() {
            if let Some(x) = self.decode_one(input_ids, cache)? {
                cache.len = end;
                return Ok(self.norm.forward(&x));
            }
        }
        let ids = input_ids.to_device(self.opts.device);
        let mut x = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?;
        let ctx = match cache.as_deref() {
            Some(c) if !c.pads.is_empty() => {
                if c.pads.len() != b as usize {
                    return Err(ModelError::Torch(tch::TchError::Torch(format!(
                        "a batch of {b} rows on a cache padded for {}",
                        c.pads.len()
                    ))));
                }
                self.positional.context_padded(s, past, &c.pads)
            }
            _ => self.positional.context(b, s, past),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &ctx, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(cache) = cache {
            cache.len = end;
        }
        Ok(self.norm.forward(&x))
    }

    /// Whether one-token decode steps run on raw slices (every linear on a
    /// CPU matrix–vector kernel, f32 weights on the CPU); see `decode_one`.
    pub fn decodes_on_slices(&self) -> bool {
        cpu_f32(&self.embed_tokens).is_some()
            && self.layers.iter().all(DecoderLayer::can_decode_one)
    }

    /// One token of one sequence through the layers on raw slices
    /// (`DecoderLayer::decode_one`), when every layer can and the KV cache is
    /// short enough (longer caches use libtorch's attention); the hidden
    /// states before the final norm, (1, 1, hidden).
    /// `None` when this step must take the libtorch path.
    fn decode_one(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>, ModelError> {
        /// Past this many cached positions libtorch's attention takes over
        /// from the raw step's (a cautious bound: the crossover was not
        /// measured).
        const MAX_KV: usize = 2048;
        if input_ids.size() != [1, 1]
            || cache.len >= MAX_KV
            || !cache.pads.is_empty()
            || !self.decodes_on_slices()
        {
            return Ok(None);
        }
        let Some(embed) = cpu_f32(&self.embed_tokens) else {
            return Ok(None);
        };
        let shape = [
            1,
            self.config.n_kv_heads() as i64,
            cache.capacity as i64,
            self.config.head_dim() as i64,
        ];
        let cache_ok = cache.layers.iter().all(|(k, v)| {
            [k, v]
                .iter()
                .all(|t| t.size() == shape && cpu_f32(t).is_some())
        });
        if !cache_ok {
            return Ok(None);
        }
        let hidden = self.config.hidden_size;
        let id = input_ids.int64_value(&[0, 0]);
        let vocab = self.embed_tokens.size()[0];
        if !(0..vocab).contains(&id) {
            return Err(ModelError::Torch(tch::TchError::Torch(format!(
                "token id {id} outside the vocabulary (0..{vocab})"
            ))));
        }
        let mut x = embed[id as usize * hidden..(id as usize + 1) * hidden].to_vec();
        let ctx = self.positional.context(1, 1, cache.len as i64);
        let (cos, sin) = (
            ctx.cos_sin.0.to_kind(Kind::Float).contiguous(),
            ctx.cos_sin.1.to_kind(Kind::Float).contiguous(),
        );
        let (cos, sin) = (
            cpu_f32(&cos).expect("a CPU f32 table"),
            cpu_f32(&sin).expect("a CPU f32 table"),
        );
        let mut buffers = StepBuffers::default();
        for (i, layer) in self.layers.iter().enumerate() {
            layer.decode_one(&mut x, cos, sin, cache, i, &mut buffers);
        }
        Ok(Some(Tensor::from_slice(&x).view([1, 1, hidden as i64])))
    }

    /// A training pass with gradient checkpointing: the layers run once
    /// without autograd, keeping only each layer's input; `head` computes
    /// the loss from the final hidden states (after the norm) and
    /// backpropagates into them; then, from the last layer down, each layer
    /// runs again with autograd on its saved input and its gradient is
    /// pushed through it (`Σ out ⊙ ∂L/∂out`, whose backward accumulates the
    /// trainable parameters' gradients and yields ∂L/∂input). Activation
    /// memory is one layer's instead of all of them, for one extra forward
    /// of the layers. `reseed(i)` runs before both forwards of layer `i`, so
    /// that dropout draws the same masks in both. Returns what `head`
    /// returns.
    pub fn checkpointed_backward<T>(
        &self,
        input_ids: &Tensor,
        reseed: &dyn Fn(usize),
        head: &mut dyn FnMut(&Tensor) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        let (b, s) = input_ids.size2()?;
        if s as usize > self.max_positions() {
            return Err(ModelError::TooLong {
                what: "the sequence",
                len: s as usize,
                max: self.max_positions(),
            });
        }
        let ids = input_ids.to_device(self.opts.device);
        let ctx = self.positional.context(b, s, 0);
        let mut inputs = Vec::with_capacity(self.layers.len());
        let last = tch::no_grad(|| -> Result<Tensor, ModelError> {
            let mut x = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?;
            for (i, layer) in self.layers.iter().enumerate() {
                reseed(i);
                let next = layer.forward(&x, &ctx, None);
                inputs.push(x);
                x = next;
            }
            Ok(x)
        })?;
        let last = last.detach().set_requires_grad(true);
        let out = head(&self.norm.forward(&last))?;
        let mut grad = last.grad();
        if !grad.defined() {
            return Ok(out); // nothing trainable behind the head's input
        }
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let x = inputs.pop().expect("one input per layer");
            let x = x.set_requires_grad(i > 0);
            reseed(i);
            let y = layer.forward(&x, &ctx, None);
            if y.requires_grad() {
                let kind = match y.kind() {
                    Kind::Double => Kind::Double,
                    _ => Kind::Float,
                };
                (y * &grad).f_sum(kind)?.f_backward()?;
            }
            if i > 0 {
                grad = x.grad();
                if !grad.defined() {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Logits (batch, seq, vocab) in the model's dtype.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        Ok(self.lm_head.forward(&hidden))
    }

    /// Logits of the last position only, (batch, vocab), in f32: what
    /// generation needs, without the output projection of every prompt token.
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        let s = hidden.size()[1];
        let last = hidden.narrow(1, s - 1, 1).squeeze_dim(1);
        Ok(self.lm_head.forward(&last).to_kind(Kind::Float))
    }

    /// Every linear layer with its HF module name (`model.layers.0.self_attn.q_proj`),
    /// for adapters and quantizers to wrap or replace.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = &mut layer.self_attn;
            let p = format!("model.layers.{i}.self_attn");
            out.push((format!("{p}.q_proj"), &mut attn.q_proj));
            out.push((format!("{p}.k_proj"), &mut attn.k_proj));
            out.push((format!("{p}.v_proj"), &mut attn.v_proj));
            out.push((format!("{p}.o_proj"), &mut attn.o_proj));
            let mlp = &mut layer.mlp;
            let p = format!("model.layers.{i}.mlp");
            out.push((format!("{p}.gate_proj"), &mut mlp.gate_proj));
            out.push((format!("{p}.up_proj"), &mut mlp.up_proj));
            out.push((format!("{p}.down_proj"), &mut mlp.down_proj));
        }
        out
    }
}
