//! Feed-forward blocks: gated (SwiGLU, GeGLU), gated with one fused `gate_up` matrix, and
//! plain two-layer MLPs.

use super::activation;
use super::gguf_weights::GgufWeights;
use super::linear::Linear;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::{Activation, VarBuilder};

/// A position-wise feed-forward block.
#[derive(Debug, Clone)]
pub enum Mlp {
    /// `down(act(gate(x)) * up(x))`.
    Gated {
        /// The gate projection.
        gate: Linear,
        /// The up projection.
        up: Linear,
        /// The down projection.
        down: Linear,
        /// The gate's activation.
        act: Activation,
    },
    /// The gated block with gate and up in one matrix, output `[gate | up]` (Phi-3).
    FusedGated {
        /// `[gate | up]`.
        gate_up: Linear,
        /// The down projection.
        down: Linear,
        /// The gate's activation.
        act: Activation,
        /// Width of each half.
        intermediate: usize,
    },
    /// `fc2(act(fc1(x)))`.
    Plain {
        /// The first projection.
        fc1: Linear,
        /// The second projection.
        fc2: Linear,
        /// The activation between them.
        act: Activation,
    },
}

impl Mlp {
    /// The gated block in the Hugging Face layout: `gate_proj`, `up_proj`, `down_proj`, no
    /// biases.
    pub fn load_gated(
        vb: &VarBuilder,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        Self::load_gated_named(
            vb,
            ["gate_proj", "up_proj", "down_proj"],
            hidden,
            intermediate,
            act,
        )
    }

    /// The gated block with the architecture's names for gate, up and down, no biases.
    pub fn load_gated_named(
        vb: &VarBuilder,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Mlp::Gated {
            gate: Linear::load(vb.pp(gate), hidden, intermediate, false)?,
            up: Linear::load(vb.pp(up), hidden, intermediate, false)?,
            down: Linear::load(vb.pp(down), intermediate, hidden, false)?,
            act,
        })
    }

    /// The gated block in llama.cpp's layout: `{prefix}.ffn_gate`, `ffn_up`, `ffn_down`; gate
    /// and up become one fused matrix where our kernels compute both
    /// ([`GgufWeights::fused_linear`]).
    pub fn gated_from_gguf(
        w: &mut GgufWeights,
        prefix: &str,
        (hidden, intermediate): (usize, usize),
        act: Activation,
    ) -> Result<Self> {
        let (gate, up) = (
            format!("{prefix}.ffn_gate.weight"),
            format!("{prefix}.ffn_up.weight"),
        );
        let fused = w.fused_linear(&[(&gate, intermediate), (&up, intermediate)], hidden)?;
        let mut linear = |name: &str, shape| w.linear(&format!("{prefix}.{name}.weight"), shape);
        if let Some(gate_up) = fused {
            return Ok(Mlp::FusedGated {
                gate_up,
                down: linear("ffn_down", [hidden, intermediate])?,
                act,
                intermediate,
            });
        }
        Ok(Mlp::Gated {
            gate: linear("ffn_gate", [intermediate, hidden])?,
            up: linear("ffn_up", [intermediate, hidden])?,
            down: linear("ffn_down", [hidden, intermediate])?,
            act,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => activation::gated(*act, &x.apply(gate)?, &x.apply(up)?)?.apply(down),
            Mlp::FusedGated {
                gate_up,
                down,
                act,
                intermediate,
            } => activation::gated_fused(*act, &x.apply(gate_up)?, *intermediate)?.apply(down),
            Mlp::Plain { fc1, fc2, act } => x.apply(fc1)?.apply(act)?.apply(fc2),
        }
    }
}
