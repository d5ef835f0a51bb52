//! Builds the Kineto shim (`csrc/kineto_shim.cpp`) against libtorch's headers
//! and embeds libtorch's library directory as an rpath, so binaries and tests
//! run without `LD_LIBRARY_PATH`.
//!
//! torch-sys exports libtorch's lib directory through its `links = "tch"`
//! metadata as `DEP_TCH_LIBTORCH_LIB` (`<torch>/lib`); the headers live in
//! `<torch>/include` and `<torch>/include/torch/csrc/api/include`, and the
//! flags mirror torch-sys's own build of its C++ wrapper.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/kineto_shim.cpp");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => {
            // torch-sys always exports it on Linux and macOS; without it we
            // cannot find the headers, and the link would fail later with a
            // far less helpful message.
            panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not export libtorch's lib dir");
        }
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let root = lib.parent().map(PathBuf::from).unwrap_or_default();
    // torch >= 2.7 wheels and libtorch builds use the new C++11 ABI; torch-sys
    // defaults to it too and honours the same override.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/kineto_shim.cpp")
        .compile("omni_kineto_shim");
}
