//! The GGUF reader on small files: a real one written by gguf-py
//! (`fixtures/tiny-quants.gguf`) and malformed ones built in memory.
use omni_engine::quant::{with_kernel_build, KernelBuild};
use omni_engine::{Device, Error, GgmlType, GgufFile, GgufValue, Kind};

#[path = "fixtures/reference.rs"]
mod reference;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(serde::Deserialize)]
struct QuantTensor {
    name: String,
    ggml_type: String,
    shape: Vec<i64>,
    values: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Quants {
    file: String,
    tensors: Vec<QuantTensor>,
}

fn quants() -> Result<(GgufFile, Quants), Box<dyn std::error::Error>> {
    let dir = reference::fixtures_dir();
    let q: Quants = serde_json::from_str(&std::fs::read_to_string(dir.join("tiny-quants.json"))?)?;
    Ok((GgufFile::open(dir.join(&q.file))?, q))
}

#[test]
fn metadata_of_every_type_reads_back() -> TestResult {
    let (g, _) = quants()?;
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture()?, "llama");
    assert_eq!(
        g.get("general.name").and_then(GgufValue::as_str),
        Some("tiny-quants")
    );
    assert_eq!(g.get("test.u8"), Some(&GgufValue::U8(7)));
    assert_eq!(g.get("test.i32"), Some(&GgufValue::I32(-5)));
    assert_eq!(g.get("test.f32"), Some(&GgufValue::F32(0.5)));
    assert_eq!(g.get("test.bool"), Some(&GgufValue::Bool(true)));
    let arr: Vec<u64> = g
        .get("test.array_u32")
        .and_then(GgufValue::as_array)
        .ok_or("array_u32")?
        .iter()
        .filter_map(GgufValue::as_u64)
        .collect();
    assert_eq!(arr, [1, 2, 3]);
    let strs: Vec<&str> = g
        .get("test.array_str")
        .and_then(GgufValue::as_array)
        .ok_or("array_str")?
        .iter()
        .filter_map(GgufValue::as_str)
        .collect();
    assert_eq!(strs, ["a", "bc", "日本"]);
    Ok(())
}

#[test]
fn every_supported_type_dequantizes_like_gguf_py() -> TestResult {
    let (g, q) = quants()?;
    assert_eq!(q.tensors.len(), 7);
    for t in &q.tensors {
        let info = g.tensor_info(&t.name).ok_or("tensor missing")?;
        assert_eq!(info.ggml_type.name(), t.ggml_type);
        assert_eq!(info.shape(), t.shape);
        // K-quants are unpacked by the quantized kernels' decoders: every
        // build this CPU runs must read them as gguf-py does.
        for build in KernelBuild::detected().up_to() {
            let x = with_kernel_build(build, || g.dequantize(&t.name, Kind::Float, Device::Cpu))?;
            assert_eq!(x.size(), t.shape);
            let got: Vec<f32> = Vec::<f32>::try_from(x.flatten(0, -1))?;
            for (i, (a, b)) in got.iter().zip(&t.values).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{} element {i} ({build:?}): {a} vs gguf-py {b}",
                    t.name
                );
            }
        }
        // Into another dtype too: bf16 keeps 8 significant bits, so each
        // value is gguf-py's within half a unit in the last place: 2^-9 of
        // the binade's base, at most 2^-8 of the value.
        let h = g.dequantize(&t.name, Kind::BFloat16, Device::Cpu)?;
        assert_eq!(h.kind(), Kind::BFloat16);
        let got: Vec<f32> = Vec::<f32>::try_from(h.to_kind(Kind::Float).flatten(0, -1))?;
        assert_eq!(got.len(), t.values.len());
        for (i, (a, b)) in got.iter().zip(&t.values).enumerate() {
            assert!(
                (a - b).abs() <= b.abs() / 256.0 + 1e-30,
                "{} element {i} in bf16: {a} vs gguf-py {b}",
                t.name
            );
        }
    }
    Ok(())
}

/// Builds GGUF images byte by byte.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }
    fn header(&mut self, tensors: u64, kvs: u64) -> &mut Self {
        self.buf.extend_from_slice(b"GGUF");
        self.u32(3).u64(tensors).u64(kvs)
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(8).str(v)
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad(&mut self, align: usize) -> &mut Self {
        while self.buf.len() % align != 0 {
            self.buf.push(0);
        }
        self
    }
    fn parse(&self) -> omni_engine::Result<GgufFile> {
        GgufFile::from_bytes(self.buf.clone(), "mem.gguf")
    }
}

/// One f32 tensor [2, 32] of a llama-arch model.
fn valid() -> Writer {
    let mut w = Writer::default();
    w.header(1, 1).kv_str("general.architecture", "llama");
    w.tensor("t", &[32, 2], 0, 0).pad(32);
    w.buf.extend(std::iter::repeat_n(0u8, 2 * 32 * 4));
    w
}

fn format_reason(r: omni_engine::Result<GgufFile>) -> String {
    match r {
        Err(Error::Format { reason, format, .. }) => {
            assert_eq!(format, "gguf");
            reason
        }
        Err(other) => panic!("expected a format error, got {other}"),
        Ok(_) => panic!("expected a format error, got a parsed file"),
    }
}

#[test]
fn a_valid_image_parses() -> TestResult {
    let g = valid().parse()?;
    let t = g.dequantize("t", Kind::Float, Device::Cpu)?;
    assert_eq!(t.size(), [2, 32]);
    Ok(())
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = valid().buf;
    for len in 0..full.len() {
        let r = GgufFile::from_bytes(full[..len].to_vec(), "cut.gguf");
        assert!(
            r.is_err(),
            "a file cut at {len} of {} bytes parsed",
            full.len()
        );
    }
}

#[test]
fn bad_magic_and_version_are_named() {
    let mut w = valid();
    w.buf[0] = b'X';
    assert!(format_reason(w.parse()).contains("magic"));
    let mut w = valid();
    w.buf[4] = 9;
    assert!(format_reason(w.parse()).contains("version 9"));
}

#[test]
fn declared_sizes_are_capped_by_the_bytes_remaining() {
    // A string length of 2^60.
    let mut w = Writer::default();
    w.header(0, 1).u64(1 << 60).u64(0).u64(0);
    let r = format_reason(w.parse());
    assert!(r.contains("metadata key #0 length"), "{r}");
    // An array of 2^40 u32s.
    let mut w = Writer::default();
    w.header(0, 1).str("a").u32(9).u32(4).u64(1 << 40).u64(0);
    let r = format_reason(w.parse());
    assert!(r.contains("array length"), "{r}");
    // 2^50 tensors.
    let mut w = Writer::default();
    w.header(1 << 50, 0);
    assert!(format_reason(w.parse()).contains("tensor_count"));
    // 2^50 key/values.
    let mut w = Writer::default();
    w.header(0, 1 << 50);
    assert!(format_reason(w.parse()).contains("metadata_kv_count"));
}

#[test]
fn tensor_infos_are_validated() {
    // Data past the end of the file.
    let mut w = Writer::default();
    w.header(1, 0).tensor("t", &[32, 1000], 0, 0).pad(32);
    assert!(format_reason(w.parse()).contains("truncated"));
    // Five dimensions.
    let mut w = Writer::default();
    w.header(1, 0).tensor("t", &[1, 1, 1, 1, 1], 0, 0);
    assert!(format_reason(w.parse()).contains("n_dims 5"));
    // Dimensions whose product overflows.
    let mut w = Writer::default();
    w.header(1, 0).tensor("t", &[1 << 40, 1 << 40], 0, 0);
    assert!(format_reason(w.parse()).contains("overflow"));
    // A Q4_0 row that is not whole blocks.
    let mut w = Writer::default();
    w.header(1, 0).tensor("t", &[33, 1], 2, 0);
    assert!(format_reason(w.parse()).contains("block size"));
    // A misaligned offset.
    let mut w = Writer::default();
    w.header(1, 0).tensor("t", &[1], 0, 3).pad(32);
    w.buf.extend([0u8; 64]);
    assert!(format_reason(w.parse()).contains("aligned"));
    // An unknown value type.
    let mut w = Writer::default();
    w.header(0, 1).str("k").u32(99);
    assert!(format_reason(w.parse()).contains("unknown value type 99"));
}

#[test]
fn unsupported_quantization_is_named() -> TestResult {
    // Q5_0 (type 6): sized, so the file opens, but not dequantizable.
    let mut w = Writer::default();
    w.header(1, 1).kv_str("general.architecture", "llama");
    w.tensor("blk.0.q5", &[32], 6, 0).pad(32);
    w.buf.extend([0u8; 22]);
    let g = w.parse()?;
    assert_eq!(
        g.tensor_info("blk.0.q5").map(|t| t.ggml_type),
        Some(GgmlType(6))
    );
    match g.dequantize("blk.0.q5", Kind::Float, Device::Cpu) {
        Err(Error::UnsupportedQuantization { tensor, kind, .. }) => {
            assert_eq!(tensor, "blk.0.q5");
            assert_eq!(kind, "Q5_0");
        }
        other => panic!("expected UnsupportedQuantization, got {other:?}"),
    }
    Ok(())
}

#[test]
fn unknown_architecture_is_named() -> TestResult {
    let mut w = Writer::default();
    w.header(0, 1).kv_str("general.architecture", "mamba");
    let g = w.parse()?;
    match g.model_config() {
        Err(Error::UnknownArchitecture { name, .. }) => assert_eq!(name, "mamba"),
        other => panic!("expected UnknownArchitecture, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_hyperparameters_name_the_key() -> TestResult {
    let mut w = Writer::default();
    w.header(0, 1).kv_str("general.architecture", "qwen2");
    let err = w.parse()?.model_config().err().ok_or("config parsed")?;
    let msg = err.to_string();
    assert!(
        msg.contains("qwen2.embedding_length") && msg.contains("missing"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn gguf_names_map_to_hf_names() {
    use omni_engine::gguf_to_hf_name as m;
    assert_eq!(m("token_embd.weight"), "model.embed_tokens.weight");
    assert_eq!(m("output.weight"), "lm_head.weight");
    assert_eq!(m("output_norm.weight"), "model.norm.weight");
    assert_eq!(
        m("blk.7.attn_q.weight"),
        "model.layers.7.self_attn.q_proj.weight"
    );
    assert_eq!(
        m("blk.7.attn_q.bias"),
        "model.layers.7.self_attn.q_proj.bias"
    );
    assert_eq!(
        m("blk.0.attn_k_norm.weight"),
        "model.layers.0.self_attn.k_norm.weight"
    );
    assert_eq!(
        m("blk.12.ffn_down.weight"),
        "model.layers.12.mlp.down_proj.weight"
    );
    assert_eq!(
        m("blk.1.ffn_norm.weight"),
        "model.layers.1.post_attention_layernorm.weight"
    );
    assert_eq!(m("rope_freqs.weight"), "rope_freqs.weight");
}

/// A one-layer `arch` model whose q (2 heads) and k (1 head) projections,
/// 8 x 8 and 4 x 8, hold 0, 1, 2, ... in stored row order; returns the
/// q and k weights as loaded (rows of 8 values).
fn stored_qk(arch: &str) -> Result<(Vec<f32>, Vec<f32>), Box<dyn std::error::Error>> {
    let mut w = Writer::default();
    w.header(3, 6).kv_str("general.architecture", arch);
    for (k, v) in [
        ("embedding_length", 8),
        ("attention.head_count", 2),
        ("attention.head_count_kv", 1),
        ("block_count", 1),
        ("feed_forward_length", 16),
    ] {
        w.kv_u32(&format!("{arch}.{k}"), v);
    }
    // GGUF lists dimensions innermost first: [columns, rows].
    w.tensor("blk.0.attn_q.weight", &[8, 8], 0, 0)
        .tensor("blk.0.attn_k.weight", &[8, 4], 0, 256)
        .tensor("token_embd.weight", &[8, 5], 0, 384)
        .pad(32);
    for n in [64, 32, 40] {
        for i in 0..n {
            w.buf.extend_from_slice(&(i as f32).to_le_bytes());
        }
    }
    let g = w.parse()?;
    let weights = g.load_weights(&g.model_config()?, Kind::Float, Device::Cpu)?;
    let get = |name: &str| -> Result<Vec<f32>, Box<dyn std::error::Error>> {
        Ok(Vec::<f32>::try_from(weights.get(name)?.flatten(0, -1))?)
    };
    Ok((
        get("model.layers.0.self_attn.q_proj.weight")?,
        get("model.layers.0.self_attn.k_proj.weight")?,
    ))
}

/// llama.cpp stores llama/mistral q/k rows permuted per head (row
/// `j * half + i` of a head at `i * 2 + j`) for GGML's interleaved RoPE, and
/// the loader undoes it; qwen2/qwen3 use NEOX RoPE and are stored as HF has
/// them, so their rows must come back untouched.
#[test]
fn q_k_rows_are_unpermuted_for_llama_only() -> TestResult {
    let arange = |n: usize| (0..n).map(|i| i as f32).collect::<Vec<f32>>();
    // HF row r of a head of `dim` rows, from the stored (permuted) rows.
    let unpermuted = |rows: usize, heads: usize| -> Vec<f32> {
        let (dim, half) = (rows / heads, rows / heads / 2);
        let mut out = Vec::new();
        for r in 0..rows {
            let (h, within) = (r / dim, r % dim);
            let (j, i) = (within / half, within % half);
            let stored = h * dim + i * 2 + j;
            out.extend((0..8).map(|c| (stored * 8 + c) as f32));
        }
        out
    };
    for arch in ["qwen2", "qwen3"] {
        let (q, k) = stored_qk(arch)?;
        assert_eq!((q, k), (arange(64), arange(32)), "{arch}: rows moved");
    }
    for arch in ["llama", "mistral"] {
        let (q, k) = stored_qk(arch)?;
        assert_eq!(q, unpermuted(8, 2), "{arch}: q rows");
        assert_eq!(k, unpermuted(4, 1), "{arch}: k rows");
        assert_ne!(q, arange(64), "{arch}: q left permuted");
    }
    Ok(())
}
