//! Makes the binaries (and test executables) find libtorch at run time, keeps
//! the CUDA backend linked, and compiles qcoder's one C++ file.
//!
//! * rpath: `scripts/setup` installs libtorch into the project venv; the
//!   binaries carry its `lib/` directory as an rpath, so they run without
//!   `LD_LIBRARY_PATH`.
//! * `--no-as-needed`: nothing in qcoder calls a symbol of `libtorch_cuda.so`
//!   directly, so with the default `--as-needed` the linker drops it and
//!   `tch::Cuda::is_available()` is false on GPU machines (tch-rs #980, #329,
//!   pytorch#36437). Relinking it after `--no-as-needed` keeps it in DT_NEEDED.
//! * `src/model/int8_linear.cpp`: the int8 autograd function of
//!   `model::int8`, which libtorch only lets C++ declare. Built with the
//!   flags torch-sys builds its own C++ with (C++17, the libtorch's C++11 ABI
//!   setting, `LIBTORCH_CXX11_ABI`, default 1).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/model/int8_linear.cpp");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!(
            "LIBTORCH is not set: run scripts/setup, which installs libtorch into .venv \
             and points .cargo/config.toml's LIBTORCH at it"
        );
    };
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib_dir = libtorch.join("lib");
    let include = libtorch.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file("src/model/int8_linear.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // The file's loops: `omp simd` reductions without an OpenMP runtime,
        // f32 rounding as written (no fused multiply-add), and int32 results
        // rewritten as floats in place.
        .flag("-fopenmp-simd")
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        // Numerics: optimised in every profile, as the dependencies are.
        .opt_level(3)
        .warnings(false)
        .compile("qcoder_int8");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
