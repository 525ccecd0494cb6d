//! Mixture of experts: a softmax router picks, per token, the experts it goes through, and
//! their outputs are summed with the router's weights.
//!
//! Mixtral and DeepSeek-V2 share the dispatch (each expert runs once, on the tokens routed to
//! it) and the top-k selection; they differ in how the router is computed, whether the top-k
//! weights are renormalised, and DeepSeek's group-limited choice, which are [`Routing`]
//! settings.

use super::linear::Linear;
use super::mlp::Mlp;
use crate::error::Result;
use candle_core::{DType, Module, Tensor, D};

/// How a token's experts and their weights follow from the router's probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub top_k: usize,
    /// Group-limited choice (DeepSeek-V2's `group_limited_greedy`): only the experts of the
    /// `topk_group` groups (of `n_group`) with the best single score compete.
    pub groups: Option<(usize, usize)>,
    /// Divides the chosen weights by their sum (Mixtral).
    pub renormalize: bool,
    /// Multiplies the chosen weights (DeepSeek's `routed_scaling_factor`).
    pub scale: f64,
}

impl Routing {
    /// The experts of one token and their weights, from its router probabilities.
    pub fn route(&self, probs: &[f32]) -> Vec<(usize, f32)> {
        let masked: Vec<f32> = match self.groups {
            None => probs.to_vec(),
            Some((n_group, topk_group)) => {
                // Keep the experts of the `topk_group` groups with the highest best score.
                let per_group = probs.len() / n_group;
                let group_best: Vec<f32> = probs
                    .chunks(per_group)
                    .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                    .collect();
                let kept = top_indices(&group_best, topk_group);
                probs
                    .iter()
                    .enumerate()
                    .map(|(e, &p)| {
                        if kept.contains(&(e / per_group)) {
                            p
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        };
        let top = top_indices(&masked, self.top_k);
        let sum: f32 = top.iter().map(|&e| masked[e]).sum();
        top.into_iter()
            .map(|e| {
                let w = if self.renormalize {
                    masked[e] / sum
                } else {
                    masked[e]
                };
                (
                    e,
                    if self.scale == 1.0 {
                        w
                    } else {
                        w * self.scale as f32
                    },
                )
            })
            .collect()
    }
}

/// Indices of the `k` largest values, largest first (the earlier index first on ties).
pub fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// The router: a linear layer whose softmax, in F32 as transformers computes it, gives each
/// token's expert probabilities.
#[derive(Debug, Clone)]
pub struct Router {
    /// `(experts, hidden)`.
    pub gate: Linear,
    /// Whether the gate holds F32 weights that read F32 activations (DeepSeek), rather than
    /// model-dtype weights whose scores are cast to F32 (Mixtral).
    pub f32_input: bool,
}

impl Router {
    /// `(tokens, experts)` probabilities for `(tokens, hidden)` activations.
    fn probs(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        let logits = if self.f32_input {
            x.to_dtype(DType::F32)?.apply(&self.gate)?
        } else {
            x.apply(&self.gate)?.to_dtype(DType::F32)?
        };
        Ok(candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?)
    }
}

/// Routed experts, plus shared experts every token goes through (DeepSeek).
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// The router.
    pub router: Router,
    /// The routed experts.
    pub experts: Vec<Mlp>,
    /// Experts every token goes through, added to the routed sum.
    pub shared: Option<Mlp>,
    /// How experts are chosen.
    pub routing: Routing,
    /// The dtype the expert outputs are weighted in: the activations' (Mixtral) or F32.
    pub weight_dtype: Option<DType>,
}

impl SparseMoe {
    /// `x` is `(.., hidden)`; each token goes through its experts, weighted.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shape = x.shape().clone();
        let flat = x.reshape(((), x.dim(D::Minus1)?))?;
        let probs = self.router.probs(&flat)?;
        // Tokens and weights per expert, then each expert runs once on its tokens.
        let mut assigned = vec![(Vec::<u32>::new(), Vec::<f32>::new()); self.experts.len()];
        for (token, p) in probs.iter().enumerate() {
            for (expert, weight) in self.routing.route(p) {
                assigned[expert].0.push(token as u32);
                assigned[expert].1.push(weight);
            }
        }
        let weight_dtype = self.weight_dtype.unwrap_or(flat.dtype());
        let mut out = flat.zeros_like()?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(assigned) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens, n, flat.device())?;
            let w = Tensor::from_vec(weights, (n, 1), flat.device())?.to_dtype(weight_dtype)?;
            let y = expert.forward(&flat.index_select(&idx, 0)?)?;
            let y = y
                .to_dtype(weight_dtype)?
                .broadcast_mul(&w)?
                .to_dtype(out.dtype())?;
            out = out.index_add(&idx, &y, 0)?;
        }
        let out = out.reshape(shape)?;
        Ok(match &self.shared {
            Some(shared) => (out + x.apply(shared)?)?,
            None => out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renormalised_top_k_weights_sum_to_one() {
        let routing = Routing {
            top_k: 2,
            groups: None,
            renormalize: true,
            scale: 1.0,
        };
        assert_eq!(
            routing.route(&[0.1, 0.6, 0.2, 0.1]),
            vec![(1, 0.75), (2, 0.25)]
        );
    }
}
