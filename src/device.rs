//! Device strings (`cpu`, `cuda:N`, `metal:N`) and the candle devices they name.

use crate::error::{Error, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// Where a model runs. Parsed from `cpu`, `cuda:N` or `metal:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// CUDA GPU number N (needs the `cuda` feature).
    Cuda(usize),
    /// Metal GPU number N (needs the `metal` feature).
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |message: &str| Error::Device {
            device: s.to_string(),
            message: message.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        if lower == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        let (kind, index) = match lower.split_once(':') {
            Some((kind, index)) => (kind, Some(index)),
            None => (lower.as_str(), None),
        };
        let index = match index {
            None => 0,
            Some(i) => i
                .parse::<usize>()
                .map_err(|_| bad("the device index must be a non-negative integer; allowed: cpu, cuda:N, metal:N"))?,
        };
        match kind {
            "cuda" => Ok(DeviceSpec::Cuda(index)),
            "metal" => Ok(DeviceSpec::Metal(index)),
            _ => Err(bad("unknown device; allowed: cpu, cuda:N, metal:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the candle device. Fails with a clear error when the build lacks the backend.
    pub fn open(&self) -> Result<Device> {
        let err = |message: String| Error::Device {
            device: self.to_string(),
            message,
        };
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(err(
                        "this build has no CUDA support; rebuild with `--features cuda`".into(),
                    ));
                }
                Device::new_cuda(i).map_err(|e| err(e.to_string()))
            }
            DeviceSpec::Metal(i) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(err(
                        "this build has no Metal support; rebuild with `--features metal`".into(),
                    ));
                }
                Device::new_metal(i).map_err(|e| err(e.to_string()))
            }
        }
    }

    /// True for the host CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }
}
