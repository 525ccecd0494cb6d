//! Which SIMD level the kernels run at: detected once, optionally lowered by
//! `LLM_POOL_KERNEL_LEVEL` so tests and benchmarks can exercise every level on one machine.

use std::sync::OnceLock;

/// The environment variable that forces a lower level.
pub const LEVEL_ENV: &str = "LLM_POOL_KERNEL_LEVEL";

/// A kernel level, lowest first (the derived order is used to cap the detected level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Portable Rust; the only level on other architectures.
    Scalar,
    /// AVX2 + FMA + F16C: `maddubs` + `madd` for the byte products.
    Avx2,
    /// AVX-VNNI (VEX-encoded `vpdpbusd` on ymm).
    AvxVnni,
    /// AVX-512 VNNI + VL + BW (EVEX `vpdpbusd` on ymm, mask-register fifth bits for Q5_0).
    Avx512Vnni,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 4] = [
        Level::Scalar,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512Vnni,
    ];

    /// The name used by [`LEVEL_ENV`].
    pub const fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avx-vnni",
            Level::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Parses a [`LEVEL_ENV`] value.
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the level.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Level::Scalar => true,
                Level::Avx2 => avx2,
                Level::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                Level::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Scalar
        }
    }

    /// The best level this CPU supports (detected once, then cached).
    pub fn detect() -> Level {
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            Level::ALL
                .into_iter()
                .rev()
                .find(|l| l.supported())
                .unwrap_or(Level::Scalar)
        })
    }

    /// The levels this CPU supports, lowest first.
    pub fn available() -> Vec<Level> {
        Level::ALL.into_iter().filter(|l| l.supported()).collect()
    }
}

/// The level the kernels use: the detected one, capped by [`LEVEL_ENV`] when it names a lower
/// one (an unknown name or a higher level than the CPU has is ignored, with a warning).
/// Read once and cached: the feature checks and the variable are not re-read per matmul.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = Level::detect();
        match std::env::var(LEVEL_ENV) {
            Err(_) => detected,
            Ok(v) => match Level::parse(&v) {
                Some(l) => l.min(detected),
                None => {
                    tracing::warn!(
                        "{LEVEL_ENV}={v:?} is not one of scalar, avx2, avx-vnni, avx512-vnni; \
                         using {}",
                        detected.name()
                    );
                    detected
                }
            },
        }
    })
}
