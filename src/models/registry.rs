//! The registry: [`register_architectures!`] turns the one list of architectures (in
//! `models/mod.rs`) into the [`AnyArchitecture`](super::AnyArchitecture) enum, its
//! [`LanguageModel`](super::LanguageModel) dispatch and the [`ARCHITECTURES`](super::ARCHITECTURES)
//! table of [`ArchitectureEntry`] rows that detection and the generic tests walk.

use super::{AnyArchitecture, LoadOptions, ModelSource, WeightFormat, ARCHITECTURES};
use crate::error::Result;

/// One row of the registration table: what detection needs to know about an architecture.
pub struct ArchitectureEntry {
    /// The registered name.
    pub name: &'static str,
    /// Which files it loads from.
    pub format: WeightFormat,
    /// `model_type` / `general.architecture` names it is detected by.
    pub model_types: &'static [&'static str],
    /// config.json `architectures[0]` fallbacks.
    pub hf_classes: &'static [&'static str],
    /// Loads it into the enum.
    pub load: fn(ModelSource, &LoadOptions) -> Result<AnyArchitecture>,
}

impl std::fmt::Debug for ArchitectureEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchitectureEntry")
            .field("name", &self.name)
            .field("format", &self.format)
            .finish()
    }
}

/// Generates the enum over all architectures, its [`LanguageModel`](super::LanguageModel)
/// dispatch, and the [`ARCHITECTURES`] table, from one list of `Variant => module::Type` lines,
/// and re-exports each module of `arch/` as `models::module`. Every name it uses is written
/// out in full, so the expansion does not depend on what the invoking module imports.
///
/// The modules themselves are declared in `arch/mod.rs`, which is private: a module that is
/// declared there but not listed is never used, which clippy's `-D warnings` rejects; a line
/// listed without its module does not compile.
macro_rules! register_architectures {
    ($($variant:ident => $module:ident :: $ty:ident),+ $(,)?) => {
        $(pub use $crate::models::arch::$module;)+

        /// One loaded model of any registered architecture.
        pub enum AnyArchitecture {
            $(
                #[allow(missing_docs)]
                $variant($crate::models::Adapter<$module::$ty>),
            )+
        }

        impl $crate::models::LanguageModel for AnyArchitecture {
            fn forward(
                &mut self,
                input_ids: &::candle_core::Tensor,
                position: usize,
            ) -> $crate::error::Result<::candle_core::Tensor> {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::forward(m, input_ids, position),)+
                }
            }

            fn reset_cache(&mut self) -> $crate::error::Result<()> {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::reset_cache(m),)+
                }
            }

            fn info(&self) -> &$crate::models::ModelInfo {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::info(m),)+
                }
            }

            fn forward_batch(
                &mut self,
                batch: &[$crate::models::BatchItem],
            ) -> $crate::error::Result<::candle_core::Tensor> {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::forward_batch(m, batch),)+
                }
            }

            fn slots(&self) -> usize {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::slots(m),)+
                }
            }

            fn set_slots(&mut self, n: usize) -> $crate::error::Result<()> {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::set_slots(m, n),)+
                }
            }

            fn reset_slot(&mut self, slot: usize) -> $crate::error::Result<()> {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::reset_slot(m, slot),)+
                }
            }

            fn truncate_slot(&mut self, slot: usize, keep: usize) -> $crate::error::Result<bool> {
                use $crate::models::LanguageModel;
                match self {
                    $(AnyArchitecture::$variant(m) => LanguageModel::truncate_slot(m, slot, keep),)+
                }
            }
        }

        /// Every registered architecture, in registration order.
        pub static ARCHITECTURES: &[$crate::models::ArchitectureEntry] = &[
            $($crate::models::ArchitectureEntry {
                name: <$module::$ty as $crate::models::Architecture>::NAMES.name,
                format: <$module::$ty as $crate::models::Architecture>::NAMES.format,
                model_types: <$module::$ty as $crate::models::Architecture>::NAMES.model_types,
                hf_classes: <$module::$ty as $crate::models::Architecture>::NAMES.hf_classes,
                load: |source, options| {
                    <$module::$ty as $crate::models::Architecture>::load(source, options)
                        .map(AnyArchitecture::$variant)
                },
            },)+
        ];
    };
}

// Invoked by path from `models/mod.rs`, where the list is.
pub(super) use register_architectures;

/// Looks an architecture up by its registered name.
pub fn architecture(name: &str) -> Option<&'static ArchitectureEntry> {
    ARCHITECTURES.iter().find(|a| a.name == name)
}
