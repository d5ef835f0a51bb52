//! GGUF: llama.cpp's single-file model format.
//!
//! The reader parses the header, every metadata key/value (all types,
//! arrays included) and the tensor infos, then dequantizes tensors on demand
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) into the dtype and device
//! the engine asks for, or hands the quantized blocks over as stored
//! ([`crate::weights::Blocks::Keep`]). It also turns the metadata into a [`ModelConfig`] and renames
//! tensors to the Hugging Face names model code expects, undoing the row
//! permutation llama.cpp's converter applies to Llama q/k projections.
//!
//! Every size the file declares (string lengths, array counts, tensor counts,
//! dimensions, offsets) is capped and checked against the bytes that remain
//! before anything is allocated, as candle's `quantized/gguf_file.rs` does: a
//! truncated or hostile file gives [`Error::Format`], never a panic or a huge
//! allocation.
//!
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::quant::{has_kernel, QuantizedTensor};
use crate::weights::{Blocks, Weights};

const MAGIC: &[u8; 4] = b"GGUF";
/// `general.alignment` when the file does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper nesting than this is not seen in
/// practice and would only serve to blow the stack.
const MAX_ARRAY_DEPTH: usize = 3;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string` (UTF-8).
    String(String),
    /// `array` of any one type.
    Array(Vec<GgufValue>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer of
    /// any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, when it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }
}

/// A ggml tensor type id (`ggml_type`), known or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit float.
    pub const F32: GgmlType = GgmlType(0);
    /// 16-bit float.
    pub const F16: GgmlType = GgmlType(1);
    /// 4-bit, blocks of 32 with an f16 scale.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 4-bit, blocks of 32 with an f16 scale and minimum.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 8-bit, blocks of 32 with an f16 scale.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 4-bit K-quant: super-blocks of 256, 6-bit sub-block scales and minimums.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// 6-bit K-quant: super-blocks of 256, 8-bit scales per 16.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name for the type (`Q4_1`), or `type N` when unknown.
    pub fn name(self) -> String {
        match self.layout() {
            Some((name, _, _)) => name.to_owned(),
            None => format!("type {}", self.0),
        }
    }

    /// `(name, elements per block, bytes per block)` from ggml's type
    /// traits, for every type whose size we know (so that files with types
    /// we cannot dequantize can still be opened and validated).
    fn layout(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            30 => ("BF16", 1, 2),
            _ => return None,
        })
    }

    /// `(elements, bytes)` per block, when the layout is known.
    pub fn block(self) -> Option<(u64, u64)> {
        self.layout().map(|(_, elems, bytes)| (elems, bytes))
    }

    /// Whether [`GgufFile::dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        matches!(self.0, 0 | 1 | 2 | 3 | 8 | 12 | 14 | 30)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// llama.cpp's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section (aligned).
    pub offset: u64,
    /// Bytes of data, when the type's layout is known.
    pub byte_len: Option<u64>,
}

impl GgufTensorInfo {
    /// The shape in torch order (outermost first): ggml's dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        // Every dim was checked to fit an i64 when the file was parsed.
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Number of elements.
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open GGUF file: metadata and tensor infos parsed, data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses `path`; the tensor data stays memory-mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; like every
        // mmap-based loader (candle, safetensors) we assume the model file is
        // not truncated by someone else while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_owned(), Storage::Mmap(mmap))
    }

    /// Parses a GGUF image held in memory; `name` stands for the path in
    /// error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<Self> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let mut r = Reader {
            bytes,
            pos: 0,
            path: &path,
        };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(r.err(format!(
                "bad magic {magic:02x?} at offset 0 (expected \"GGUF\")"
            )));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("unsupported version {version} (supported: 2, 3)")));
        }
        let tensor_count = r.u64("tensor_count")?;
        let kv_count = r.u64("metadata_kv_count")?;
        // Smallest possible key/value: 8-byte key length, 4-byte type, 1 byte.
        r.check_count(kv_count, 13, "metadata_kv_count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of metadata {key:?}"))?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        // Smallest tensor info: name length 8, n_dims 4, type 4, offset 8.
        r.check_count(tensor_count, 24, "tensor_count")?;
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut by_name = HashMap::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("tensor #{i} name"))?;
            let n_dims = r.u32(&format!("tensor {name:?} n_dims"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.err(format!(
                    "tensor {name:?} has n_dims {n_dims} (allowed 1..={MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let dim = r.u64(&format!("tensor {name:?} dim {d}"))?;
                if dim > i64::MAX as u64 {
                    return Err(r.err(format!("tensor {name:?} dim {d} = {dim} is too large")));
                }
                dims.push(dim);
            }
            let ggml_type = GgmlType(r.u32(&format!("tensor {name:?} type"))?);
            let offset = r.u64(&format!("tensor {name:?} offset"))?;
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| r.err(format!("tensor {name:?} dims {dims:?} overflow")))?;
            let byte_len = match ggml_type.layout() {
                Some((tname, block, size)) => {
                    if dims[0] % block != 0 {
                        return Err(r.err(format!(
                            "tensor {name:?} of type {tname} has row length {} not a multiple of its block size {block}",
                            dims[0]
                        )));
                    }
                    Some(
                        (n / block)
                            .checked_mul(size)
                            .ok_or_else(|| r.err(format!("tensor {name:?} byte size overflows")))?,
                    )
                }
                None => None,
            };
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(r.err(format!("tensor {name:?} appears twice")));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                byte_len,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(r.err(format!("general.alignment = {v:?} is not a power of two"))),
            },
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            if t.offset % alignment != 0 {
                return Err(r.err(format!(
                    "tensor {:?} offset {} is not aligned to {alignment}",
                    t.name, t.offset
                )));
            }
            if let Some(len) = t.byte_len {
                let end = data_offset
                    .checked_add(t.offset)
                    .and_then(|s| s.checked_add(len));
                match end {
                    Some(end) if end <= file_len => {}
                    _ => {
                        return Err(r.err(format!(
                            "tensor {:?} ({} bytes at data offset {}) runs past the end of the file ({file_len} bytes); the file is truncated",
                            t.name, len, t.offset
                        )))
                    }
                }
            }
        }
        Ok(Self {
            path,
            storage,
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_offset,
        })
    }

    /// The file this came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// One tensor's info, by llama.cpp name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's raw bytes as stored (quantized blocks included), for
    /// kernels that consume ggml blocks directly.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&GgufTensorInfo, &[u8])> {
        let info = self.tensor_info(name).ok_or_else(|| Error::Weight {
            name: name.to_owned(),
            reason: format!("missing from {}", self.path.display()),
        })?;
        let len = info
            .byte_len
            .ok_or_else(|| Error::UnsupportedQuantization {
                path: self.path.clone(),
                tensor: name.to_owned(),
                kind: info.ggml_type.name(),
            })?;
        // Bounds were checked at parse time.
        let start = (self.data_offset + info.offset) as usize;
        Ok((info, &self.storage.bytes()[start..start + len as usize]))
    }

    /// Dequantizes one tensor (llama.cpp name, stored row order) into `kind`
    /// on `device`, shaped in torch order.
    pub fn dequantize(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let unsupported = || Error::UnsupportedQuantization {
            path: self.path.clone(),
            tensor: name.to_owned(),
            kind: info.ggml_type.name(),
        };
        if !info.ggml_type.is_supported() {
            return Err(unsupported());
        }
        dequantize_bytes(info.ggml_type, bytes, &info.shape(), kind, device)?
            .ok_or_else(unsupported)
    }

    fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(GgufValue::String(s)) => Ok(s),
            Some(v) => {
                Err(self.field_err(key, format!("expected a string, found {}", v.type_name())))
            }
            None => Err(self.field_err(key, "missing".to_owned())),
        }
    }

    fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.field_err(key, format!("expected an unsigned integer, found {v:?}"))
                }),
        }
    }

    fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.field_err(key, format!("expected a number, found {v:?}"))),
        }
    }

    fn field_err(&self, key: &str, reason: String) -> Error {
        Error::ModelConfig {
            path: self.path.clone(),
            field: key.to_owned(),
            reason,
        }
    }

    /// The runtime model configuration from `general.architecture` and the
    /// `<arch>.*` keys.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch_name = self.architecture()?;
        let architecture =
            Architecture::from_name(arch_name).ok_or_else(|| Error::UnknownArchitecture {
                name: arch_name.to_owned(),
                source_name: format!("{} (general.architecture)", self.path.display()),
                supported: Architecture::SUPPORTED.to_owned(),
            })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let required = |k: &str| -> Result<usize> {
            let full = key(k);
            self.get_usize(&full)?
                .ok_or_else(|| self.field_err(&full, "missing".to_owned()))
        };
        let hidden_size = required("embedding_length")?;
        let num_attention_heads = required("attention.head_count")?;
        if num_attention_heads == 0 {
            return Err(self.field_err(
                &key("attention.head_count"),
                "must be positive, found 0".into(),
            ));
        }
        let num_key_value_heads = self
            .get_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(self.field_err(
                &key("attention.head_count_kv"),
                format!("{num_key_value_heads} does not divide head_count {num_attention_heads}"),
            ));
        }
        let head_dim = match self.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        let vocab_size = match self.get_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match self
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
            {
                Some(tokens) => tokens.len(),
                None => self
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.dims.get(1).copied())
                    .ok_or_else(|| self.field_err(&key("vocab_size"), "missing".into()))?
                    as usize,
            },
        };
        let rope_scaling = match self
            .get(&key("rope.scaling.type"))
            .and_then(GgufValue::as_str)
        {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: self
                    .get_f64(&key("rope.scaling.factor"))?
                    .ok_or_else(|| self.field_err(&key("rope.scaling.factor"), "missing".into()))?,
            }),
            Some(other) => {
                return Err(self.field_err(
                    &key("rope.scaling.type"),
                    format!("unsupported rope scaling {other:?} (supported: none, linear)"),
                ))
            }
        };
        let mut eos_token_ids = Vec::new();
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = self.get_usize(k)? {
                let id = u32::try_from(id)
                    .map_err(|_| self.field_err(k, format!("{id} out of range")))?;
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let bos_token_id = match self.get_usize("tokenizer.ggml.bos_token_id")? {
            Some(id) => Some(u32::try_from(id).map_err(|_| {
                self.field_err("tokenizer.ggml.bos_token_id", format!("{id} out of range"))
            })?),
            None => None,
        };
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            num_hidden_layers: required("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self
                .get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.get_usize(&key("context_length"))?.unwrap_or(2048),
            // llama.cpp's converter drops `output.weight` when the model ties it.
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            attention_bias: self.tensor_info("blk.0.attn_q.bias").is_some(),
            qk_norm: self.tensor_info("blk.0.attn_q_norm.weight").is_some(),
            bos_token_id,
            eos_token_ids,
            embedding_size: None,
            mrope_section: None,
        })
    }

    /// Every tensor, dequantized into `kind` on `device`, under Hugging Face
    /// names. Llama-family q/k projections get llama.cpp's row permutation
    /// undone so that HF's `rotate_half` RoPE applies.
    pub fn load_weights(
        &self,
        config: &ModelConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Weights> {
        self.load_weights_with(config, kind, device, Blocks::Dequantize)
    }

    /// [`GgufFile::load_weights`], keeping the quantized blocks of every
    /// matrix the kernels read when `blocks` says so (fp32 on the CPU only:
    /// elsewhere everything is dequantized).
    pub fn load_weights_with(
        &self,
        config: &ModelConfig,
        kind: Kind,
        device: Device,
        blocks: Blocks,
    ) -> Result<Weights> {
        let keep = blocks == Blocks::Keep && device == Device::Cpu && kind == Kind::Float;
        let arch = self.architecture()?;
        // llama.cpp's `convert_hf_to_gguf.py` permutes q/k rows for the
        // architectures whose GGML RoPE is the interleaved ("normal") kind;
        // Qwen2/Qwen3 use NEOX RoPE there and are stored unpermuted.
        let permuted = matches!(arch, "llama" | "mistral");
        let mut weights = Weights::new();
        for info in &self.tensors {
            let hf = hf_name(&info.name);
            let heads = if !permuted {
                None
            } else if info.name.contains(".attn_q.") {
                Some(config.num_attention_heads)
            } else if info.name.contains(".attn_k.") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            let unpermute = |t: &Tensor, h: usize| {
                unpermute_rows(t, h as i64).map_err(|e| Error::Weight {
                    name: info.name.clone(),
                    reason: format!("cannot undo llama.cpp's q/k permutation with {h} heads: {e}"),
                })
            };
            if keep && info.dims.len() == 2 && has_kernel(info.ggml_type) {
                let (_, bytes) = self.tensor_bytes(&info.name)?;
                let mut q = quantized_rows(info.ggml_type, bytes, &info.shape())?;
                if let Some(h) = heads {
                    // Whole rows move, so their blocks move with them.
                    q.bytes = unpermute(&q.bytes, h)?;
                }
                weights.insert_quantized(hf, q);
                continue;
            }
            let mut t = self.dequantize(&info.name, Kind::Float, device)?;
            if let Some(h) = heads {
                t = unpermute(&t, h)?;
            }
            weights.insert(hf, t.f_to_kind(kind)?);
        }
        Ok(weights)
    }
}

/// llama.cpp tensor name -> Hugging Face name; unknown names pass through.
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_owned();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return gguf.to_owned();
    };
    let Some((part, suffix)) = rest.split_once('.') else {
        return gguf.to_owned();
    };
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return gguf.to_owned(),
    };
    format!("model.layers.{layer}.{hf_part}.{suffix}")
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows grouped per head as
/// `[half, 2]` pairs go back to `[2, half]` (transformers'
/// `reverse_permute_weights`). Works for weights `[rows, cols]` and biases
/// `[rows]`.
fn unpermute_rows(t: &Tensor, heads: i64) -> Result<Tensor, tch::TchError> {
    let shape = t.size();
    let rows = shape[0];
    if heads <= 0 || rows % (heads * 2) != 0 {
        return Err(tch::TchError::Shape(format!(
            "{rows} rows are not a multiple of 2 * {heads} heads"
        )));
    }
    let mut split = vec![heads, rows / heads / 2, 2];
    split.extend_from_slice(&shape[1..]);
    t.f_reshape(&split)?.f_transpose(1, 2)?.f_reshape(&shape)
}

/// Turns one tensor's stored bytes into `kind` on `device`; `Ok(None)` for a
/// type this function does not handle. Q8_0/Q4_0/Q4_1 blocks are unpacked
/// with tensor ops on the target device (fast whatever our own crate's
/// optimisation level, and only the packed bytes cross to a GPU); K-quants
/// by the quantized kernels' decoders on the CPU, then moved.
pub fn dequantize_bytes(
    ty: GgmlType,
    bytes: &[u8],
    shape: &[i64],
    kind: Kind,
    device: Device,
) -> Result<Option<Tensor>> {
    let n: i64 = shape.iter().product();
    let plain = |k: Kind| -> Result<Tensor> {
        Ok(tensor_from_bytes(bytes, shape, k)?
            .f_to_device(device)?
            .f_to_kind(kind)?)
    };
    let t = match ty {
        GgmlType::F32 => plain(Kind::Float)?,
        GgmlType::F16 => plain(Kind::Half)?,
        GgmlType::BF16 => plain(Kind::BFloat16)?,
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let block_bytes = match ty {
                GgmlType::Q8_0 => 34,
                GgmlType::Q4_0 => 18,
                _ => 20,
            };
            if n % 32 != 0 {
                return Err(Error::Weight {
                    name: format!("{ty} tensor of shape {shape:?}"),
                    reason: "element count is not a multiple of the block size 32".into(),
                });
            }
            let nb = n / 32;
            let raw =
                tensor_from_bytes(bytes, &[nb, block_bytes], Kind::Uint8)?.f_to_device(device)?;
            // Little-endian f16 fields at the start of each block.
            let half = |at: i64| -> Result<Tensor> {
                Ok(raw
                    .f_narrow(1, at, 2)?
                    .f_contiguous()?
                    .f_view_dtype(Kind::Half)?
                    .f_to_kind(Kind::Float)?)
            };
            let d = half(0)?;
            let values = if ty == GgmlType::Q8_0 {
                let q = raw
                    .f_narrow(1, 2, 32)?
                    .f_contiguous()?
                    .f_view_dtype(Kind::Int8)?;
                q.f_to_kind(Kind::Float)?.f_mul(&d)?
            } else {
                let qs_at = if ty == GgmlType::Q4_0 { 2 } else { 4 };
                let qs = raw.f_narrow(1, qs_at, 16)?;
                // Element j of a block is the low nibble of byte j, element
                // j + 16 the high nibble (ggml's `dequantize_row_q4_*`).
                let lo = qs.f_bitwise_and(0x0f)?;
                let hi = qs.f_bitwise_right_shift_tensor_scalar(4)?;
                let q = Tensor::f_cat(&[lo, hi], 1)?.f_to_kind(Kind::Float)?;
                if ty == GgmlType::Q4_0 {
                    q.f_sub_scalar(8.0)?.f_mul(&d)?
                } else {
                    q.f_mul(&d)?.f_add(&half(2)?)?
                }
            };
            values.f_reshape(shape)?.f_to_kind(kind)?
        }
        GgmlType::Q4_K | GgmlType::Q6_K => {
            // Unpacked by the quantized kernels' decoders on the CPU (the
            // layouts are too irregular for tensor ops to be worth it).
            let q = quantized_rows(ty, bytes, shape)?;
            q.dequantize()?
                .f_reshape(shape)?
                .f_to_device(device)?
                .f_to_kind(kind)?
        }
        _ => return Ok(None),
    };
    Ok(Some(t))
}

/// A tensor's blocks as rows of its last dimension (a `[.., cols]` tensor
/// becomes `rows = numel / cols` rows), copied into a CPU uint8 tensor.
pub(crate) fn quantized_rows(ty: GgmlType, bytes: &[u8], shape: &[i64]) -> Result<QuantizedTensor> {
    let bad = |reason: String| Error::Weight {
        name: format!("{ty} tensor of shape {shape:?}"),
        reason,
    };
    let (elems, block_bytes) = ty
        .block()
        .ok_or_else(|| bad("unknown block layout".to_owned()))?;
    let cols = *shape
        .last()
        .ok_or_else(|| bad("no dimensions".to_owned()))?;
    if cols <= 0 || cols as u64 % elems != 0 {
        return Err(bad(format!(
            "rows of {cols} elements are not whole blocks of {elems}"
        )));
    }
    let rows: i64 = shape[..shape.len() - 1].iter().product();
    let row_bytes = (cols as u64 / elems * block_bytes) as i64;
    Ok(QuantizedTensor {
        ggml_type: ty,
        shape: [rows, cols],
        bytes: tensor_from_bytes(bytes, &[rows, row_bytes], Kind::Uint8)?,
    })
}

/// A CPU tensor copied from `bytes`, which must hold exactly `shape` of
/// `kind` (libtorch would read past a short slice).
pub(crate) fn tensor_from_bytes(bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor> {
    let numel = shape.iter().try_fold(
        1i64,
        |acc, &d| if d < 0 { None } else { acc.checked_mul(d) },
    );
    let need = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as i64));
    if need != Some(bytes.len() as i64) {
        return Err(Error::Weight {
            name: format!("{kind:?} tensor of shape {shape:?}"),
            reason: format!("needs {need:?} bytes, the file holds {}", bytes.len()),
        });
    }
    Ok(Tensor::f_from_data_size(bytes, shape, kind)?)
}

/// A bounds-checked little-endian cursor over the file image.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: String) -> Error {
        Error::Format {
            path: self.path.to_owned(),
            format: "gguf",
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A declared count of items of at least `min_size` bytes each must fit
    /// in what remains, before anything is allocated for it.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(need) if need <= self.remaining() as u64 => Ok(()),
            _ => Err(self.err(format!(
                "{what} = {count} cannot fit in the {} bytes remaining at offset {}",
                self.remaining(),
                self.pos
            ))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        self.check_count(len, 1, &format!("{what} length"))?;
        let at = self.pos;
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|e| self.err(format!("{what} at offset {at} is not UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("value of {key:?}");
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(&what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem = self.u32(&what)?;
                let count = self.u64(&what)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(self.err(format!("{what}: unknown array element type {other}")))
                    }
                };
                self.check_count(count, min, &format!("{what} array length"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(self.err(format!("{what}: unknown value type {other}"))),
        })
    }
}
