//! ONNX model files, read for their weights: the initializers (tensors) and
//! the graph's nodes, whose names say which module an anonymous initializer
//! belongs to and whose attributes carry sizes the weights do not (strides,
//! dilations, paddings).
//!
//! Decoded with `prost` from the subset of `onnx.proto` (ONNX IR, opset
//! independent) that weights need; every other field is skipped. Only
//! tensors stored inline (`raw_data`, or `float_data`/`int64_data`) are
//! supported: a model with external data files is refused with a clear
//! error. Nothing here runs the graph.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Largest ONNX file read (the format itself caps a protobuf at 2 GiB).
const MAX_FILE_BYTES: u64 = 2 << 30;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    double_data: Vec<f64>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// ONNX `TensorProto.DataType`s we read, with their libtorch kind and width.
fn kind_of(data_type: i32) -> Option<(Kind, usize)> {
    Some(match data_type {
        1 => (Kind::Float, 4),
        2 => (Kind::Uint8, 1),
        3 => (Kind::Int8, 1),
        5 => (Kind::Int16, 2),
        6 => (Kind::Int, 4),
        7 => (Kind::Int64, 8),
        9 => (Kind::Bool, 1),
        10 => (Kind::Half, 2),
        11 => (Kind::Double, 8),
        16 => (Kind::BFloat16, 2),
        _ => return None,
    })
}
/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// One node of the graph: what the weights need of it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxNode {
    /// The node's name, e.g. `/dec/ups.0/ConvTranspose` (PyTorch's exporter
    /// names nodes after the module path).
    pub name: String,
    /// The operator, e.g. `Conv`.
    pub op_type: String,
    /// Input value names (initializer names among them).
    pub inputs: Vec<String>,
    /// Integer-list attributes (`strides`, `pads`, `dilations`...).
    pub ints: HashMap<String, Vec<i64>>,
    /// Integer attributes (`group`...).
    pub int: HashMap<String, i64>,
}

impl OnnxNode {
    /// The module path of a node named by PyTorch's exporter:
    /// `/enc_p/encoder/attn_layers.0/conv_q/Conv` → `enc_p.encoder.attn_layers.0.conv_q`.
    pub fn module_path(&self) -> String {
        let parts: Vec<&str> = self.name.trim_matches('/').split('/').collect();
        parts[..parts.len().saturating_sub(1)].join(".")
    }
}

/// An ONNX file's weights and nodes.
#[derive(Debug)]
pub struct OnnxFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Initializers by name, as CPU tensors (f32 or i64).
    pub initializers: HashMap<String, Tensor>,
    /// The graph's nodes, in file order.
    pub nodes: Vec<OnnxNode>,
}

impl OnnxFile {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Format {
            path: path.to_path_buf(),
            format: "onnx",
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if len > MAX_FILE_BYTES {
            return Err(bad(format!(
                "{len} bytes: larger than an ONNX protobuf can be"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model = ModelProto::decode(bytes.as_slice())
            .map_err(|e| bad(format!("not an ONNX model: {e}")))?;
        drop(bytes);
        let graph = model
            .graph
            .ok_or_else(|| bad("the model has no graph".to_owned()))?;
        let mut initializers = HashMap::with_capacity(graph.initializer.len());
        for t in graph.initializer {
            let name = t.name.clone();
            // Strings, complex numbers and the like are graph constants no
            // weight is made of; they are left out.
            if kind_of(t.data_type).is_none() {
                continue;
            }
            let tensor =
                to_tensor(t).map_err(|reason| bad(format!("initializer {name:?}: {reason}")))?;
            initializers.insert(name, tensor);
        }
        let nodes = graph
            .node
            .into_iter()
            .map(|n| OnnxNode {
                ints: n
                    .attribute
                    .iter()
                    .filter(|a| !a.ints.is_empty())
                    .map(|a| (a.name.clone(), a.ints.clone()))
                    .collect(),
                int: n
                    .attribute
                    .iter()
                    .filter(|a| a.ints.is_empty())
                    .map(|a| (a.name.clone(), a.i))
                    .collect(),
                name: n.name,
                op_type: n.op_type,
                inputs: n.input,
            })
            .collect();
        Ok(OnnxFile {
            path: path.to_path_buf(),
            initializers,
            nodes,
        })
    }
}

/// An initializer as a tensor; its declared shape is checked against the
/// bytes it holds.
fn to_tensor(t: TensorProto) -> std::result::Result<Tensor, String> {
    if t.data_location == EXTERNAL {
        return Err("stored in an external data file, which is not supported".to_owned());
    }
    let dims = t.dims.clone();
    if dims.iter().any(|&d| d < 0) {
        return Err(format!("negative dimension in {dims:?}"));
    }
    let numel = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| format!("shape {dims:?} overflows"))?;
    let (kind, width) = kind_of(t.data_type)
        .ok_or_else(|| format!("data type {} is not supported", t.data_type))?;
    let tensor = if !t.raw_data.is_empty() {
        if t.raw_data.len() != numel * width {
            return Err(format!(
                "shape {dims:?} needs {} bytes, raw_data holds {}",
                numel * width,
                t.raw_data.len()
            ));
        }
        // ONNX raw_data is little-endian, as the tensors we build.
        Tensor::f_from_data_size(&t.raw_data, &dims, kind).map_err(|e| e.to_string())?
    } else if kind == Kind::Float && t.float_data.len() == numel {
        Tensor::from_slice(&t.float_data).reshape(&dims)
    } else if kind == Kind::Int64 && t.int64_data.len() == numel {
        Tensor::from_slice(&t.int64_data).reshape(&dims)
    } else if kind == Kind::Int && t.int32_data.len() == numel {
        Tensor::from_slice(&t.int32_data).reshape(&dims)
    } else if kind == Kind::Double && t.double_data.len() == numel {
        Tensor::from_slice(&t.double_data).reshape(&dims)
    } else {
        return Err(format!("shape {dims:?} but no data of that size"));
    };
    Ok(tensor)
}
