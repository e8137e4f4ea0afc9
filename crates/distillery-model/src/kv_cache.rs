use burn::tensor::Tensor;

/// Keys and values of the positions already processed, one entry per layer, owned by the caller
/// and passed to [`Llama::forward_with`](crate::Llama::forward_with).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

/// One layer's keys and values: buffers `[batch, kv_heads, capacity, head_dim]` whose first
/// `len` positions are filled. New positions are written in place, so a decoding step copies
/// one position rather than the whole history.
#[derive(Debug, Default)]
pub struct LayerCache {
    buffers: Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
    /// Positions the first allocation reserves.
    reserved: usize,
}

/// Where one layer's new keys and values go, and so at which positions its rows' queries sit.
pub(crate) enum LayerKv<'a> {
    /// Sequences from position 0 that nothing keeps (training, evaluation).
    Fresh,
    /// Every row continues one cache, from its length on.
    Shared(&'a mut LayerCache),
    /// Row `i` continues cache `i`, each from its own length: sequences of different lengths
    /// decoded together.
    PerRow(Vec<&'a mut LayerCache>),
}

impl KvCache {
    /// A cache that grows as positions arrive.
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache that holds `positions` positions without reallocating.
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| LayerCache {
                    reserved: positions,
                    ..LayerCache::default()
                })
                .collect(),
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

    /// Forgets every position from `len` on, in place: the next positions overwrite them
    /// (speculative decoding drops the drafted tokens the model rejected).
    pub(crate) fn truncate(&mut self, len: usize) {
        assert!(len <= self.len, "a cache only rolls back");
        self.len = len;
        for layer in &mut self.layers {
            layer.len = layer.len.min(len);
        }
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}

impl LayerCache {
    /// Positions cached: where the next one goes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends the new positions and returns every cached key and value, views of the buffers.
    /// The views must be dropped before the next append for it to write in place; otherwise
    /// the write copies the buffer first, which is slower but still correct.
    pub(crate) fn append(&mut self, key: Tensor<4>, value: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [batch, heads, new, head_dim] = key.dims();
        let end = self.len + new;
        let (keys, values) = match self.buffers.take() {
            Some((keys, values)) if keys.dims()[2] >= end => (keys, values),
            previous => {
                let held = previous.as_ref().map_or(0, |(keys, _)| keys.dims()[2]);
                let capacity = end.max(self.reserved).max(2 * held);
                let device = key.device();
                let fresh = || Tensor::<4>::zeros([batch, heads, capacity, head_dim], &device);
                let (mut keys, mut values) = (fresh(), fresh());
                if let Some((old_keys, old_values)) = previous {
                    let filled = [0..batch, 0..heads, 0..self.len, 0..head_dim];
                    keys = keys.slice_assign(filled.clone(), old_keys.slice(filled.clone()));
                    values = values.slice_assign(filled.clone(), old_values.slice(filled));
                }
                (keys, values)
            }
        };
        let arriving = [0..batch, 0..heads, self.len..end, 0..head_dim];
        let keys = keys.slice_assign(arriving.clone(), key);
        let values = values.slice_assign(arriving, value);
        let filled = [0..batch, 0..heads, 0..end, 0..head_dim];
        let views = (
            keys.clone().slice(filled.clone()),
            values.clone().slice(filled),
        );
        self.buffers = Some((keys, values));
        self.len = end;
        views
    }
}
