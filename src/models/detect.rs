//! Architecture detection: config.json `model_type` (falling back to `architectures[0]`) for a
//! directory, `general.architecture` for a `.gguf` file. Detection walks the registration
//! table, so a newly registered architecture is detected with no change here.

use super::gguf::GgufFile;
use super::hf::HfModelDir;
use super::{ArchitectureEntry, ModelSource, WeightFormat, ARCHITECTURES};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Opens `path` and finds the registered architecture that loads it.
pub fn detect(path: &Path) -> Result<(ModelSource, &'static ArchitectureEntry)> {
    if !path.exists() {
        return Err(Error::model_file(path, "no such file or directory"));
    }
    if path.is_dir() {
        let dir = HfModelDir::open(path)?;
        let entry = detect_hf(path, dir.config.value())?;
        Ok((ModelSource::Hf(dir), entry))
    } else if path.extension().is_some_and(|e| e == "gguf") || is_gguf(path)? {
        let file = GgufFile::open(path)?;
        let arch = file.architecture()?;
        let entry = find(WeightFormat::Gguf, |e| {
            e.model_types.contains(&arch.as_str())
        })
        .ok_or_else(|| unsupported(path, &arch, WeightFormat::Gguf))?;
        Ok((ModelSource::Gguf(file), entry))
    } else {
        Err(Error::model_file(
            path,
            "not a model: pass a directory with config.json and *.safetensors, or a .gguf file",
        ))
    }
}

/// Maps a parsed config.json to its architecture.
pub fn detect_hf(path: &Path, config: &Value) -> Result<&'static ArchitectureEntry> {
    let model_type = config.get("model_type").and_then(Value::as_str);
    if let Some(mt) = model_type {
        if let Some(e) = find(WeightFormat::Safetensors, |e| e.model_types.contains(&mt)) {
            return Ok(e);
        }
    }
    let class = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    if let Some(class) = class {
        if let Some(e) = find(WeightFormat::Safetensors, |e| e.hf_classes.contains(&class)) {
            return Ok(e);
        }
    }
    let found = match (model_type, class) {
        (Some(mt), Some(c)) => format!("model_type {mt}, architectures[0] {c}"),
        (Some(mt), None) => format!("model_type {mt}"),
        (None, Some(c)) => format!("architectures[0] {c}"),
        (None, None) => "config.json has neither model_type nor architectures".to_string(),
    };
    Err(unsupported(path, &found, WeightFormat::Safetensors))
}

fn find(
    format: WeightFormat,
    pred: impl Fn(&ArchitectureEntry) -> bool,
) -> Option<&'static ArchitectureEntry> {
    ARCHITECTURES.iter().find(|e| e.format == format && pred(e))
}

fn unsupported(path: &Path, found: &str, format: WeightFormat) -> Error {
    let supported: Vec<&str> = ARCHITECTURES
        .iter()
        .filter(|e| e.format == format)
        .flat_map(|e| e.model_types.iter().copied())
        .collect();
    Error::UnsupportedArchitecture {
        path: path.to_path_buf(),
        found: found.to_string(),
        supported: format!("{} ({format})", supported.join(", ")),
    }
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(_) => Ok(false),
    }
}
