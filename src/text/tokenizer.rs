//! Loading a model's tokenizer.

use crate::error::{Error, Result};
use std::path::Path;
pub use tokenizers::Tokenizer;

/// Loads the tokenizer that belongs to the model at `model_path`: `tokenizer.json` in a model
/// directory. Returns `Ok(None)` when the model ships none.
pub fn load_for_model(model_path: &Path) -> Result<Option<Tokenizer>> {
    if model_path.is_dir() {
        let path = model_path.join("tokenizer.json");
        if path.is_file() {
            return Tokenizer::from_file(&path)
                .map(Some)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())));
        }
    }
    Ok(None)
}
