//! `--device` and `--dtype` as the user writes them.

use tch::{Device, Kind};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {spec}: CUDA was requested, but libtorch sees no CUDA device (no GPU or no driver on this machine); use --device cpu")]
    NoCuda { spec: String },
    #[error("--device {spec}: there is no CUDA device {index} (libtorch sees {count})")]
    NoSuchGpu {
        spec: String,
        index: usize,
        count: i64,
    },
    #[error("--device '{spec}' is not one of auto, cpu, cuda, cuda:N")]
    BadDevice { spec: String },
    #[error("--dtype '{spec}' is not one of f32, bf16, f16")]
    BadDtype { spec: String },
}

/// `auto` (CUDA when libtorch sees a GPU, else CPU), `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    let cuda_count = || {
        if tch::Cuda::is_available() {
            tch::Cuda::device_count()
        } else {
            0
        }
    };
    match spec {
        "auto" => Ok(if cuda_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let index = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| DeviceError::BadDevice { spec: spec.into() })?,
                None => return Err(DeviceError::BadDevice { spec: spec.into() }),
            };
            let count = cuda_count();
            if count == 0 {
                return Err(DeviceError::NoCuda { spec: spec.into() });
            }
            if index as i64 >= count {
                return Err(DeviceError::NoSuchGpu {
                    spec: spec.into(),
                    index,
                    count,
                });
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// The compute dtype: `--dtype` when given, else bf16 on CUDA and f32 on CPU.
pub fn parse_kind(spec: Option<&str>, device: Device) -> Result<Kind, DeviceError> {
    match spec {
        None => Ok(if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        }),
        Some("f32" | "float32") => Ok(Kind::Float),
        Some("bf16" | "bfloat16") => Ok(Kind::BFloat16),
        Some("f16" | "float16") => Ok(Kind::Half),
        Some(other) => Err(DeviceError::BadDtype { spec: other.into() }),
    }
}

/// A warning for a CPU run in a dtype that this x86 CPU has no instructions
/// for (AVX-512 BF16, AVX-512 FP16): libtorch then multiplies bf16 or f16
/// matrices on a slow path, 1-17 GFLOP/s against about 120 in f32 on a
/// 2-core AVX2 AMD EPYC (`scripts/bench/matmul_shapes.py` times a CPU).
/// None elsewhere (other CPUs are not measured).
pub fn slow_cpu_dtype_note(kind: Kind, device: Device) -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected;
        if device != Device::Cpu {
            return None;
        }
        let (name, feature, native) = match kind {
            Kind::BFloat16 => (
                "bf16",
                "AVX-512 BF16",
                is_x86_feature_detected!("avx512bf16"),
            ),
            Kind::Half => (
                "f16",
                "AVX-512 FP16",
                is_x86_feature_detected!("avx512fp16"),
            ),
            _ => return None,
        };
        (!native).then(|| {
            format!(
                "note: this CPU has no {feature}, so libtorch multiplies {name} matrices on a \
                 slow path here (7-130x slower than f32 on an AVX2 CPU); dtype \"f32\" is faster"
            )
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, device);
        None
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Double => "f64",
        _ => "other",
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Keeps freed CPU memory in the process instead of returning it to the
/// kernel. libtorch allocates every intermediate tensor with `malloc`, and
/// glibc serves large requests with fresh `mmap`s (and trims the heap top
/// back to the kernel), so each training step page-faulted and zeroed
/// gigabytes anew: 14% of a LoRA step's CPU time in the kernel on a 2-core
/// machine. With the mmap threshold at glibc's maximum (32 MiB; the loss's
/// larger chunk buffers are allocated once per micro-batch, see
/// `train::loss`) and trimming off, those requests are recycled from the heap; the peak footprint is unchanged (freed memory is reused,
/// not added to). No effect on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets allocator parameters; called before
        // any libtorch work starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(matches!(
            parse_device("gpu"),
            Err(DeviceError::BadDevice { .. })
        ));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(DeviceError::BadDevice { .. })
        ));
        assert_eq!(parse_kind(None, Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(
            parse_kind(Some("bf16"), Device::Cpu).unwrap(),
            Kind::BFloat16
        );
        assert!(parse_kind(Some("int8"), Device::Cpu).is_err());
    }
}
