//! Fused kernels for the operations that dominate training a small Llama on the CPU.
//!
//! burn-flex runs causal attention under autodiff as a dozen separate operations (scores,
//! mask, max, exp, sum, divide, and each one's backward), and log-softmax, SiLU and RMSNorm
//! likewise. The functions here compute each operation, forward and backward, in one
//! multi-threaded, vectorized pass over the data, as burn backend extensions for burn-flex.
//! On every other backend they compose burn's own differentiable operations, with the same
//! mathematics (tests compare the two).

mod autodiff;
mod flex;
pub mod rows;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, DispatchDevice, backend_extension};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Int, Tensor};

/// The operations as a backend extension: implemented for burn-flex and for autodiff over it.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// Per-row cross-entropy of `[rows, vocab]` logits against `[rows]` target ids.
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `silu(gate) * up`.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// RMS normalization over the last dimension, times `gain`.
    fn fused_rms_norm(x: FloatTensor<Self>, gain: FloatTensor<Self>, eps: f32)
    -> FloatTensor<Self>;
    /// Causal scaled dot-product attention with grouped key/value heads.
    fn fused_causal_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Whether `device` computes on burn-flex, directly or under autodiff.
fn is_flex(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        _ => false,
    }
}

fn fused<const D: usize>(tensor: &Tensor<D>) -> bool {
    tensor.dtype() == DType::F32 && is_flex(&tensor.device())
}

/// Per-row next-token cross-entropy: `logits` `[rows, vocab]`, `targets` `[rows]`; returns
/// `[rows]` losses, differentiable with respect to `logits`.
pub fn cross_entropy_rows(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if fused(&logits) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_cross_entropy(
            logits.into_dispatch(),
            targets.into_dispatch(),
        ));
    }
    composed::cross_entropy_rows(logits, targets)
}

/// `silu(gate) * up`, the gated activation of a SwiGLU feed-forward block.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if fused(&gate) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_swiglu(
            gate.into_dispatch(),
            up.into_dispatch(),
        ));
    }
    composed::swiglu(gate, up)
}

/// `x / sqrt(mean(x^2) + eps) * gain` over the last dimension.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gain: Tensor<1>, eps: f64) -> Tensor<D> {
    if fused(&x) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_rms_norm(
            x.into_dispatch(),
            gain.into_dispatch(),
            eps as f32,
        ));
    }
    composed::rms_norm(x, gain, eps)
}

/// Causal attention `softmax(q k^T / sqrt(head_dim)) v`.
///
/// `query`: `[batch, heads, queries, head_dim]`; `key`, `value`:
/// `[batch, kv_heads, keys, head_dim]` with `kv_heads` dividing `heads` (each key/value head
/// serves consecutive query heads) and `keys >= queries`: the queries are the last positions,
/// so with a cache they attend to every earlier position.
pub fn causal_attention(query: Tensor<4>, key: Tensor<4>, value: Tensor<4>) -> Tensor<4> {
    if fused(&query) {
        return Tensor::from_dispatch(
            <burn::backend::Dispatch as FusedOps>::fused_causal_attention(
                query.into_dispatch(),
                key.into_dispatch(),
                value.into_dispatch(),
            ),
        );
    }
    composed::causal_attention(query, key, value)
}

/// The same operations from burn's differentiable primitives: the path on every backend but
/// burn-flex, and the reference the fused kernels are tested against.
pub mod composed {
    use super::*;

    pub fn cross_entropy_rows(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let rows = targets.dims()[0];
        let picked = log_softmax(logits, 1).gather(1, targets.reshape([rows, 1]));
        picked.reshape([rows]).neg()
    }

    pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
        silu(gate) * up
    }

    pub fn rms_norm<const D: usize>(x: Tensor<D>, gain: Tensor<1>, eps: f64) -> Tensor<D> {
        let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
        (x / rms) * gain.unsqueeze()
    }

    pub fn causal_attention(query: Tensor<4>, key: Tensor<4>, value: Tensor<4>) -> Tensor<4> {
        let groups = query.dims()[1] / key.dims()[1];
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        attention(
            query,
            repeat_kv(key, groups),
            repeat_kv(value, groups),
            None,
            None,
            options,
        )
    }

    /// `[batch, kv_heads, seq, dim]` to `[batch, kv_heads * groups, seq, dim]`, each key/value
    /// head repeated for the `groups` consecutive query heads it serves.
    fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
        if groups == 1 {
            return x;
        }
        let [batch, kv_heads, seq, head_dim] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, seq, head_dim])
            .reshape([batch, kv_heads * groups, seq, head_dim])
    }
}

#[cfg(test)]
mod tests;
