//! Embeds libtorch's library directory as an rpath, so binaries and tests run
//! without `LD_LIBRARY_PATH`. torch-sys exports the directory through its
//! `links = "tch"` metadata.
//!
//! Also compiles the C++ shim in `csrc/`: the two fbgemm operators tch's
//! generated bindings leave out (fp16-weight linear layers on CPU) and the
//! CPU paged decode attention kernel, and the kernels over GGUF's quantized
//! blocks.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!(
            "torch-sys did not export DEP_TCH_LIBTORCH_LIB; is libtorch set up (scripts/setup)?"
        );
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // libtorch's headers sit next to its libraries (`.../torch/lib` and
    // `.../torch/include` in a PyTorch wheel or a libtorch zip).
    let include = PathBuf::from(&lib)
        .parent()
        .map(|p| p.join("include"))
        .unwrap_or_else(|| PathBuf::from("include"));
    // Same ABI as torch-sys assumes for the wheel (`torch._C._GLIBCXX_USE_CXX11_ABI`).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let mut build = cc::Build::new();
    // `at::parallel_for` is a header template: compiled without OpenMP it
    // runs its whole range on the calling thread (ATen's wheel is built with
    // OpenMP, `AT_PARALLEL_OPENMP`, and the template only spreads work under
    // `_OPENMP`). So the shim is compiled with `-fopenmp` and linked to the
    // very libgomp libtorch loads (from its own lib dir), so both share one
    // thread pool and one thread count. Without it, the shim stays correct,
    // on one thread.
    match libgomp(Path::new(&lib)) {
        Some(gomp) => {
            build.flag("-fopenmp");
            println!("cargo:rustc-link-arg={}", gomp.display());
        }
        None => println!(
            "cargo:warning=no libgomp next to libtorch in {lib}: the C++ shim runs on one thread"
        ),
    }
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/decode_layer.cpp")
        .file("csrc/fbgemm_fp16.cpp")
        .file("csrc/fused.cpp")
        .file("csrc/paged_attention.cpp")
        .file("csrc/pickle.cpp")
        .file("csrc/quant.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // fbgemm's headers name asmjit's types; wheels ship no asmjit.
        .include("csrc/asmjit_stub")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        // Debug info for ATen's headers makes each file take minutes.
        .debug(false)
        // The attention kernel is loops, not ATen calls: unoptimised it would
        // be slower than the path it replaces, even in debug builds.
        .opt_level(3)
        .compile("omni_shim");
}

/// libtorch's OpenMP runtime: `libgomp.so.1` in a PyPI wheel,
/// `libgomp-<hash>.so.1` in a libtorch zip.
fn libgomp(lib: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libgomp") && n.contains(".so"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}
