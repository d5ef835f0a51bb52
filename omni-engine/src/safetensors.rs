//! Hugging Face checkpoint folders: `config.json` plus `*.safetensors`.
//!
//! Shards are memory-mapped and copied tensor by tensor into the engine's
//! dtype and device, so peak memory is the loaded model plus one tensor. A
//! sharded checkpoint is found through `model.safetensors.index.json`, and
//! every tensor the index promises must be in the shard it names. The
//! `safetensors` crate validates each header (sizes, offsets, overlaps).
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ::safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::weights::Weights;

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

#[derive(serde::Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// The safetensors files of a folder, with the tensor names the index maps
/// to each (empty when there is no index).
#[derive(Debug, Clone)]
pub struct SafetensorsFiles {
    /// Shard paths, sorted.
    pub files: Vec<PathBuf>,
    /// tensor name -> shard, from the index.
    pub index: HashMap<String, PathBuf>,
}

impl SafetensorsFiles {
    /// Finds the checkpoint files of `dir`: the index's shards, or
    /// `model.safetensors`, or else every `*.safetensors` in the folder.
    pub fn find(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: Index = serde_json::from_str(&text).map_err(|e| Error::Format {
                path: index_path.clone(),
                format: "safetensors index",
                reason: e.to_string(),
            })?;
            let mut shards = BTreeSet::new();
            let mut map = HashMap::new();
            for (name, file) in index.weight_map {
                // Shard names are plain file names inside the folder.
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::Format {
                        path: index_path.clone(),
                        format: "safetensors index",
                        reason: format!(
                            "weight_map[{name:?}] = {file:?} is not a file name in the folder"
                        ),
                    });
                }
                let p = dir.join(&file);
                shards.insert(p.clone());
                map.insert(name, p);
            }
            for p in &shards {
                if !p.is_file() {
                    return Err(Error::ModelFile {
                        path: p.clone(),
                        reason: format!("shard named by {} is missing", index_path.display()),
                    });
                }
            }
            return Ok(Self {
                files: shards.into_iter().collect(),
                index: map,
            });
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Ok(Self {
                files: vec![single],
                index: HashMap::new(),
            });
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::ModelFile {
                path: dir.to_owned(),
                reason: "no *.safetensors weights in the folder".to_owned(),
            });
        }
        Ok(Self {
            files,
            index: HashMap::new(),
        })
    }

    /// Loads every tensor into `kind` on `device`.
    pub fn load(&self, kind: Kind, device: Device) -> Result<Weights> {
        self.load_prefix("", kind, device)
    }

    /// Loads the tensors whose names start with `prefix`, named without it
    /// (one part of a checkpoint that holds several models, such as
    /// Qwen2.5-Omni's `token2wav.`), into `kind` on `device`.
    pub fn load_prefix(&self, prefix: &str, kind: Kind, device: Device) -> Result<Weights> {
        let mut weights = Weights::new();
        for file in &self.files {
            load_file(file, kind, device, &mut weights, &|name| {
                name.strip_prefix(prefix).map(str::to_owned)
            })?;
        }
        for (name, shard) in &self.index {
            let Some(name) = name.strip_prefix(prefix) else {
                continue;
            };
            if !weights.contains(name) {
                return Err(Error::Weight {
                    name: name.to_owned(),
                    reason: format!(
                        "the index maps it to {} but that shard lacks it",
                        shard.display()
                    ),
                });
            }
        }
        Ok(weights)
    }
}

/// Loads the tensors of one `.safetensors` file that `rename` keeps, under
/// the names it gives, into `weights`.
fn load_file(
    path: &Path,
    kind: Kind,
    device: Device,
    weights: &mut Weights,
    rename: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only private map; we assume the checkpoint is not
    // truncated by another process while we copy out of it.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
        path: path.to_owned(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    for (name, view) in st.iter() {
        let Some(name) = rename(name) else {
            continue;
        };
        let name = name.as_str();
        let src = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(Error::UnsupportedQuantization {
                    path: path.to_owned(),
                    tensor: name.to_owned(),
                    kind: format!("safetensors dtype {other:?}"),
                })
            }
        };
        // Every failure names the file and tensor: a header the
        // safetensors crate accepts may still declare what no tensor can
        // be (a dimension past i64, a zero-size shape whose product
        // overflows).
        let bad = |reason: String| Error::Format {
            path: path.to_owned(),
            format: "safetensors",
            reason: format!("tensor {name:?}: {reason}"),
        };
        let shape = view
            .shape()
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| bad(format!("dimension out of range in {:?}", view.shape())))?;
        let t = crate::gguf::tensor_from_bytes(view.data(), &shape, src)
            .map_err(|e| bad(e.to_string()))?
            .f_to_device(device)
            .and_then(|t| t.f_to_kind(kind))
            .map_err(|e| bad(e.to_string()))?;
        weights.insert(name, t);
    }
    Ok(())
}
