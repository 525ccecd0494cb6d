//! The runtime model: [`Model`] wraps any registered architecture with what every caller needs
//! checked once, whatever the architecture: a forward's position must follow the tokens already
//! in its slot's cache (a wrong position is an error, not garbage logits), its tokens must fit
//! the context and the vocabulary, and a panic inside candle (while loading or in a forward)
//! becomes an error, with the slots it may have left half-written marked for reset. On CPU the
//! forwards run inside the model's own rayon pool.

use super::{
    detect, AnyArchitecture, ArchitectureEntry, BatchItem, LanguageModel, LoadOptions, ModelInfo,
    ModelSource,
};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// A loaded model: any architecture, plus the bookkeeping that keeps every caller honest
/// about positions, per sequence slot. This is what the engine and the workers hold.
pub struct Model {
    inner: AnyArchitecture,
    path: PathBuf,
    device: Device,
    /// Per slot: the tokens in its KV cache, and whether a failed forward may have left
    /// partial state in it (until a reset).
    slots: Vec<SlotState>,
    /// On CPU, the rayon pool this model's forwards run in (see [`Model::forward_ids_into`]).
    cpu_pool: Option<rayon::ThreadPool>,
}

#[derive(Debug, Clone, Copy, Default)]
struct SlotState {
    cached: usize,
    needs_reset: bool,
}

/// One sequence of a batched step: its slot, its new tokens, and where they start.
#[derive(Debug, Clone, Copy)]
pub struct SequenceChunk<'a> {
    /// The slot (KV cache) it runs in.
    pub slot: usize,
    /// Its new tokens (at least one).
    pub tokens: &'a [u32],
    /// The tokens already in the slot's cache: the chunk continues the slot's sequence
    /// (reset or cut the slot to start another).
    pub position: usize,
}

impl Model {
    /// Detects the architecture of `path` (a model directory or a `.gguf` file) and loads it.
    ///
    /// ```no_run
    /// use llm_pool::models::{LoadOptions, Model};
    /// let mut model = Model::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::cpu())?;
    /// let logits = model.forward_ids(&[1, 4093, 198], 0)?;
    /// assert_eq!(logits.len(), model.info().vocab_size);
    /// # Ok::<(), llm_pool::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let (source, entry) = detect::detect(path)?;
        Self::load_detected(source, entry, options)
    }

    /// Loads an already detected source with the given architecture.
    pub fn load_detected(
        source: ModelSource,
        entry: &'static ArchitectureEntry,
        options: &LoadOptions,
    ) -> Result<Self> {
        let path = source.path().to_path_buf();
        let started = std::time::Instant::now();
        // candle's loaders can panic on malformed weights (some call `unwrap`); a model file
        // must never take the process down, so the panic becomes an error naming the file.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (entry.load)(source, options)
        }))
        .map_err(|p| {
            Error::from_panic(format!("loading {} from {}", entry.name, path.display()), p)
        })?;
        let inner = loaded.map_err(|e| match e {
            Error::Candle(c) => Error::model_file(&path, format!("loading {}: {c}", entry.name)),
            other => other,
        })?;
        tracing::info!(
            architecture = entry.name,
            path = %path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let cpu_pool = options
            .device
            .is_cpu()
            .then(|| cpu_pool(entry.name))
            .flatten();
        Ok(Model {
            inner,
            path,
            device: options.device.clone(),
            slots: vec![SlotState::default()],
            cpu_pool,
        })
    }

    /// The path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Architecture name, vocabulary size, context length and end-of-sequence ids.
    pub fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    /// Number of tokens in slot 0's KV cache (the one [`Model::forward_ids`] uses).
    pub fn cached_tokens(&self) -> usize {
        self.slots[0].cached
    }

    /// Number of tokens in a slot's KV cache (0 for a slot that does not exist).
    pub fn slot_tokens(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.cached)
    }

    /// The number of sequence slots, each with its own KV cache.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Sets the number of sequence slots (at least one). New slots start empty; slots past
    /// `n` are dropped with their caches.
    pub fn set_slots(&mut self, n: usize) -> Result<()> {
        self.inner.set_slots(n)?;
        self.slots.resize(n, SlotState::default());
        Ok(())
    }

    /// Restores one slot to the freshly loaded state.
    pub fn reset_slot(&mut self, slot: usize) -> Result<()> {
        self.inner.reset_slot(slot)?;
        self.slots[slot] = SlotState::default();
        Ok(())
    }

    /// Cuts a slot's cache back to its first `keep` tokens, so that a new sequence sharing
    /// them continues from there; false (nothing changed) when this model's cache of that
    /// slot cannot be cut there.
    pub fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool> {
        let state = self.slot_state(slot)?;
        if state.needs_reset || keep > state.cached {
            return Ok(false);
        }
        let cut = self.inner.truncate_slot(slot, keep)?;
        if cut {
            self.slots[slot].cached = keep;
        }
        Ok(cut)
    }

    fn slot_state(&self, slot: usize) -> Result<SlotState> {
        self.slots
            .get(slot)
            .copied()
            .ok_or_else(|| Error::InvalidParameter {
                param: "slot".into(),
                message: format!(
                    "slot {slot} does not exist; this model has {} slots",
                    self.slots.len()
                ),
            })
    }

    /// Runs a single sequence of token ids at `position` and returns its last-position logits.
    pub fn forward_ids(&mut self, ids: &[u32], position: usize) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_ids_into(ids, position, &mut logits)?;
        Ok(logits)
    }

    /// Like [`Model::forward_ids`], but writes the logits into `out`, reusing its allocation:
    /// the decode loop calls this once per token, and a fresh vocabulary-sized `Vec` each time
    /// costs a page-faulting allocation (192 KiB for SmolLM2, 1 MiB for Gemma 3).
    pub fn forward_ids_into(
        &mut self,
        ids: &[u32],
        position: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let chunk = SequenceChunk {
            slot: 0,
            tokens: ids,
            position,
        };
        self.forward_batch_into(&[chunk], out)
    }

    /// One step over several sequences, each in its own slot: `out` receives `n × vocab`
    /// logits, row `i` for the last token of `batch[i]`. Every linear layer of the shared
    /// decoder runs once over all the step's tokens, so decoding `n` sequences together reads
    /// each weight once instead of `n` times.
    ///
    /// ```no_run
    /// use llm_pool::models::{LoadOptions, Model, SequenceChunk};
    /// let mut model = Model::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::cpu())?;
    /// model.set_slots(2)?;
    /// let mut logits = Vec::new();
    /// model.forward_batch_into(
    ///     &[
    ///         SequenceChunk { slot: 0, tokens: &[1, 4093, 198], position: 0 },
    ///         SequenceChunk { slot: 1, tokens: &[1, 22], position: 0 },
    ///     ],
    ///     &mut logits,
    /// )?;
    /// assert_eq!(logits.len(), 2 * model.info().vocab_size);
    /// # Ok::<(), llm_pool::Error>(())
    /// ```
    pub fn forward_batch_into(
        &mut self,
        batch: &[SequenceChunk<'_>],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::InvalidParameter {
                param: "batch".into(),
                message: "at least one sequence is needed".into(),
            });
        }
        let vocab = self.info().vocab_size;
        let device = self.device.clone();
        let mut items = Vec::with_capacity(batch.len());
        for chunk in batch {
            let ids = chunk.tokens;
            if ids.is_empty() {
                return Err(Error::InvalidParameter {
                    param: "input_ids".into(),
                    message: "at least one token is needed".into(),
                });
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::InvalidParameter {
                    param: "input_ids".into(),
                    message: format!("token id {bad} is outside the vocabulary (size {vocab})"),
                });
            }
            items.push(BatchItem {
                slot: chunk.slot,
                input_ids: Tensor::from_slice(ids, (1, ids.len()), &device)?,
                position: chunk.position,
            });
        }
        // On CPU the forward runs inside this model's rayon pool: candle's norms, RoPE, softmax
        // and f32 matmuls each fan out over rayon, and called from outside a pool every one of
        // them wakes a pool thread and sleeps until it is done (two context switches an op,
        // about 15% of a SmolLM2 decode step in `perf`). Inside, they start on the current
        // thread. The pool is the model's own, not candle's shared one: a pool thread waiting
        // in a join runs whatever job is queued, so two models installing into one pool would
        // each wait on the other's whole forward.
        let logits = match self.cpu_pool.take() {
            Some(pool) => {
                let result = pool.install(|| self.run_checked(&items, |m| m.forward_batch(&items)));
                self.cpu_pool = Some(pool);
                result?
            }
            None => self.run_checked(&items, |m| m.forward_batch(&items))?,
        };
        out.clear();
        let (storage, layout) = logits.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                out.extend_from_slice(&cpu.as_slice::<f32>()?[start..end]);
            }
            // GPU logits (or a strided view) come back through candle's own copy.
            _ => {
                drop(storage);
                out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// Checks every item against its slot (position, context, partial state), runs the batch
    /// with panics caught, and keeps each slot's count: on failure every slot of the batch is
    /// marked for reset.
    fn run_checked(
        &mut self,
        items: &[BatchItem],
        run: impl FnOnce(&mut AnyArchitecture) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let info = self.inner.info();
        for item in items {
            let state = self.slot_state(item.slot)?;
            if state.needs_reset {
                return Err(Error::InvalidParameter {
                    param: "position".into(),
                    message: "an earlier forward failed part way and the KV cache may hold partial state; reset the cache first".into(),
                });
            }
            if item.position != state.cached {
                return Err(Error::Position {
                    got: item.position,
                    cached: state.cached,
                });
            }
            let seq_len = item.input_ids.dim(1)?;
            if item.position + seq_len > info.max_context {
                return Err(Error::InvalidParameter {
                    param: "input_ids".into(),
                    message: format!(
                        "positions {}..{} go past the context of {} tokens of this {} model",
                        item.position,
                        item.position + seq_len,
                        info.max_context,
                        info.architecture
                    ),
                });
            }
        }
        // A panic inside candle (a shape bug, an out-of-range index) must not unwind through
        // the caller's thread: it becomes an error and the slots are marked for reset.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut self.inner)))
                .unwrap_or_else(|p| Err(Error::from_panic("model forward", p)));
        for item in items {
            let slot = &mut self.slots[item.slot];
            match &result {
                Ok(_) => {
                    slot.cached = item.position + item.input_ids.dim(1)?;
                    slot.needs_reset = false;
                }
                Err(_) => slot.needs_reset = true,
            }
        }
        result
    }
}

/// A rayon pool for one model's CPU forwards, as many threads as candle uses (`RAYON_NUM_THREADS`
/// or the cores). `None`, with a warning, when the threads cannot be started: the forwards then
/// run on the caller's thread as before.
fn cpu_pool(architecture: &str) -> Option<rayon::ThreadPool> {
    let name = architecture.to_string();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .thread_name(move |i| format!("{name}-cpu-{i}"))
        .start_handler(|_| crate::resources::lower_compute_thread_priority())
        .build()
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            tracing::warn!(architecture, error = %e, "no rayon pool for the model's forwards");
            None
        }
    }
}

impl LanguageModel for Model {
    fn forward(&mut self, input_ids: &Tensor, position: usize) -> Result<Tensor> {
        let item = BatchItem {
            slot: 0,
            input_ids: input_ids.clone(),
            position,
        };
        self.run_checked(std::slice::from_ref(&item), |m| {
            m.forward(input_ids, position)
        })
    }

    fn reset_cache(&mut self) -> Result<()> {
        self.inner.reset_cache()?;
        self.slots.fill(SlotState::default());
        Ok(())
    }

    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn forward_batch(&mut self, batch: &[BatchItem]) -> Result<Tensor> {
        self.run_checked(batch, |m| m.forward_batch(batch))
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn set_slots(&mut self, n: usize) -> Result<()> {
        Model::set_slots(self, n)
    }

    fn reset_slot(&mut self, slot: usize) -> Result<()> {
        Model::reset_slot(self, slot)
    }

    fn truncate_slot(&mut self, slot: usize, keep: usize) -> Result<bool> {
        Model::truncate_slot(self, slot, keep)
    }
}
