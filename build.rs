//! Makes the binaries (and test executables) find libtorch at run time and keep
//! the CUDA backend linked.
//!
//! * rpath: `scripts/setup` installs libtorch into the project venv; the
//!   binaries carry its `lib/` directory as an rpath, so they run without
//!   `LD_LIBRARY_PATH`.
//! * `--no-as-needed`: nothing in qcoder calls a symbol of `libtorch_cuda.so`
//!   directly, so with the default `--as-needed` the linker drops it and
//!   `tch::Cuda::is_available()` is false on GPU machines (tch-rs #980, #329,
//!   pytorch#36437). Relinking it after `--no-as-needed` keeps it in DT_NEEDED.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        return;
    };
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib_dir = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
