//! Embeds libtorch's library directory as an rpath, so binaries and tests run
//! without `LD_LIBRARY_PATH`. torch-sys exports the directory through its
//! `links = "tch"` metadata.
//!
//! Also compiles `csrc/fbgemm_fp16.cpp`, the two fbgemm operators tch's
//! generated bindings leave out (fp16-weight linear layers on CPU).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/fbgemm_fp16.cpp");
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
    cc::Build::new()
        .cpp(true)
        .file("csrc/fbgemm_fp16.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        // Debug info for ATen's headers makes this one file take minutes.
        .debug(false)
        .compile("omni_fbgemm_fp16");
}
