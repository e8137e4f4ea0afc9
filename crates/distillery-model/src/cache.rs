use burn::tensor::Tensor;

/// Keys and values of the positions already processed, one entry per layer, owned by the caller
/// and passed to [`Llama::forward_with`](crate::Llama::forward_with).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

/// One layer's keys and values, each `[batch, kv_heads, cached_positions, head_dim]`.
#[derive(Debug, Default)]
pub struct LayerCache {
    entries: Option<(Tensor<4>, Tensor<4>)>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layer_mut(&mut self, index: usize) -> &mut LayerCache {
        &mut self.layers[index]
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}

impl LayerCache {
    /// Appends the new positions and returns every cached key and value.
    pub(crate) fn append(&mut self, key: Tensor<4>, value: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (key, value) = match self.entries.take() {
            Some((cached_key, cached_value)) => (
                Tensor::cat(vec![cached_key, key], 2),
                Tensor::cat(vec![cached_value, value], 2),
            ),
            None => (key, value),
        };
        self.entries = Some((key.clone(), value.clone()));
        (key, value)
    }
}
