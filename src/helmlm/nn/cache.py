"""Key/value caches for incremental decoding.

:class:`LayerCache` keeps, for one attention layer, whatever that layer needs of past tokens: a tuple of tensors
shaped ``(B, T, ...)`` that grow along ``T``. Multi-head attention stores its keys and values (Lorentz points for
HELM-D, feature vectors for the twin); latent attention stores only the compressed latent ``c_kv`` and the shared
rotary key ``k_pe`` per token, and re-expands keys and values from them (exact: the expansion is per token).
Buffers grow by doubling, so appending one token is amortised O(1) copies.

:class:`ModelCache` holds one :class:`LayerCache` per layer plus the real-token mask of everything cached, and builds
the attention mask of each decoding step from it (:meth:`ModelCache.attention_mask`), so that left-padded batches
decode exactly like their unpadded rows. All masking of cached decoding lives here; the model only passes the new
tokens' real-token mask.

Both also carry the batch operations that transformers' ``GenerationMixin`` calls on a cache, under transformers'
names: :meth:`ModelCache.get_seq_length`, :meth:`~ModelCache.reorder_cache` (beam search),
:meth:`~ModelCache.batch_select_indices`, :meth:`~ModelCache.batch_repeat_interleave` and :meth:`~ModelCache.crop`.
Every one of them acts on all buffers of a layer alike, whatever they hold, and on the real-token mask, so the HMLA
latent cache is reordered exactly like keys and values. ``helmlm.models`` makes a ``transformers.Cache`` of it
(``HELMCache``); this module stays free of transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """Growing ``(B, T, ...)`` buffers of one layer; :meth:`append` returns views of everything cached so far."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] | None = None
        self.length = 0

    def append(self, *new: Tensor) -> tuple[Tensor, ...]:
        n = new[0].shape[1]
        if self._buffers is None or self.length + n > self._buffers[0].shape[1]:
            capacity = max(2 * (self.length + n), 16)
            grown = [t.new_empty((t.shape[0], capacity, *t.shape[2:])) for t in new]
            if self._buffers is not None:
                for g, old in zip(grown, self._buffers):
                    g[:, : self.length] = old[:, : self.length]
            self._buffers = grown
        for buf, t in zip(self._buffers, new):
            buf[:, self.length : self.length + n] = t
        self.length += n
        return tuple(buf[:, : self.length] for buf in self._buffers)

    def get_seq_length(self) -> int:
        return self.length

    def _map(self, fn) -> None:
        if self._buffers is not None:
            self._buffers = [fn(buf) for buf in self._buffers]

    def reorder_cache(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (any order, repeats allowed; beam search's reordering)."""
        self._map(lambda buf: buf.index_select(0, index.to(buf.device)))

    def batch_select_indices(self, index: Tensor) -> None:
        self._map(lambda buf: buf[index.to(buf.device) if isinstance(index, Tensor) else index])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda buf: buf.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention: a count <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)

    def reset(self) -> None:
        self._buffers, self.length = None, 0

    def nbytes(self) -> int:
        """Bytes held by the cached tokens (not the spare capacity)."""
        if self._buffers is None:
            return 0
        return sum(buf[:, : self.length].numel() * buf.element_size() for buf in self._buffers)


def visible_keys(real: Tensor, query_positions: Tensor) -> Tensor:
    """``(B, 1, N, T)``: key ``j`` is visible to the query at position ``i`` if ``j <= i`` and ``j`` is a real token
    (``real (B, T)``), and every query sees itself (so padding rows are never empty)."""
    q_pos = query_positions.unsqueeze(-1)
    k_pos = torch.arange(real.shape[1], device=real.device)
    return (((k_pos <= q_pos) & real.unsqueeze(1)) | (k_pos == q_pos)).unsqueeze(1)


class ModelCache:
    """The caches of all layers of a model and the ``(B, T)`` real-token mask of the cached positions."""

    layer_class: type[LayerCache] = LayerCache

    def __init__(self, num_layers: int) -> None:
        self.layers = [self.layer_class() for _ in range(num_layers)]
        self.mask: Tensor | None = None

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def _rows(self, layer_op: str, mask_op, arg) -> None:
        for layer in self.layers:
            getattr(layer, layer_op)(arg)
        if self.mask is not None:
            self.mask = mask_op(self.mask)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep the batch rows ``beam_idx`` of every layer and of the mask (beam search)."""
        self._rows("reorder_cache", lambda m: m.index_select(0, beam_idx.to(m.device)), beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._rows("batch_select_indices", lambda m: m[indices], indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows("batch_repeat_interleave", lambda m: m.repeat_interleave(repeats, dim=0), repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens of every layer and of the mask."""
        for layer in self.layers:
            layer.crop(tokens_to_remove)
        if self.mask is not None and tokens_to_remove:
            self.mask = self.mask[:, : self.length]

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.mask = None

    def attention_mask(self, new_real: Tensor) -> Tensor:
        """Append the new tokens' real-token mask ``(B, N)`` (1 for real tokens, 0 for padding) and return the
        ``(B, 1, N, T)`` attention mask of the ``N`` new queries over all ``T`` keys (cached + new).

        Key ``j`` is visible to the query at position ``i`` if ``j <= i`` and ``j`` is a real token; each query
        always sees itself, so padding rows are never empty. Without a cache the model gets the same semantics from
        padded document ids (every padding token a one-token document)."""
        new_real = new_real.bool()
        self.mask = new_real if self.mask is None else torch.cat([self.mask, new_real], dim=1)
        total = self.mask.shape[1]
        return visible_keys(self.mask, torch.arange(total - new_real.shape[1], total, device=self.mask.device))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class StaticLayerCache:
    """Fixed-capacity ``(B, capacity, ...)`` buffers of one layer, written at a position held in a tensor.

    :meth:`append` writes the new tokens at the model cache's ``cursor`` and returns the *whole* buffers: keys past
    the cursor are zeros and are masked by :meth:`StaticModelCache.attention_mask`. Every shape is fixed and no
    Python number changes from one step to the next, so a decoding step over this cache is one ``torch.compile``
    graph (the growing :class:`LayerCache` changes shapes, and its length is a Python int, on every step).
    """

    def __init__(self, cursor: Tensor, buffers: list[Tensor]) -> None:
        self.cursor, self.buffers = cursor, buffers

    def append(self, *new: Tensor) -> tuple[Tensor, ...]:
        index = self.cursor + torch.arange(new[0].shape[1], device=self.cursor.device)
        for buf, t in zip(self.buffers, new):
            buf.index_copy_(1, index, t.to(buf.dtype))
        return tuple(self.buffers)


class StaticModelCache:
    """A :class:`ModelCache` copied into fixed-capacity buffers (:class:`StaticLayerCache`) for compiled decoding.

    Built from the cache a prefill returned (:meth:`from_cache`); :meth:`attention_mask` and the layers write at
    ``cursor`` (a 1-element tensor), and the caller advances it with :meth:`advance` after each step. Masking is
    that of :meth:`ModelCache.attention_mask` over all ``capacity`` keys, unwritten ones never visible, so the
    attention is the same function as over the growing cache (up to summation order).
    """

    def __init__(self, layers: list[StaticLayerCache], mask: Tensor, cursor: Tensor, length: int) -> None:
        self.layers, self.mask, self.cursor, self.length = layers, mask, cursor, length

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def from_cache(cls, cache: ModelCache, capacity: int) -> StaticModelCache:
        """Copy a filled :class:`ModelCache` (a prefill's) into buffers of ``capacity`` tokens (zeros beyond)."""
        length = cache.length
        if cache.mask is None or any(layer._buffers is None for layer in cache.layers):
            raise ValueError("the cache is empty: run the prompt through the model (prefill) first")
        if capacity < length:
            raise ValueError(f"capacity {capacity} is smaller than the {length} tokens already cached")
        cursor = torch.tensor([length], device=cache.mask.device)
        layers = []
        for layer in cache.layers:
            buffers = [buf.new_zeros((buf.shape[0], capacity, *buf.shape[2:])) for buf in layer._buffers]
            for new, old in zip(buffers, layer._buffers):
                new[:, :length] = old[:, :length]
            layers.append(StaticLayerCache(cursor, buffers))
        mask = cache.mask.new_zeros((cache.mask.shape[0], capacity))
        mask[:, :length] = cache.mask
        return cls(layers, mask, cursor, length)

    def attention_mask(self, new_real: Tensor) -> Tensor:
        """Write the new tokens' real-token mask ``(B, N)`` at the cursor; the ``(B, 1, N, capacity)`` mask of the
        new queries (keys after a query's position, unwritten ones included, are never visible)."""
        index = self.cursor + torch.arange(new_real.shape[1], device=self.cursor.device)
        self.mask.index_copy_(1, index, new_real.bool())
        return visible_keys(self.mask, index)

    def check_room(self, n: int) -> None:
        """Raise ``ValueError`` unless ``n`` more tokens fit (check before a step: it writes without bounds checks)."""
        if self.length + n > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} tokens; {self.length + n} do not fit")

    def advance(self, n: int) -> None:
        """Move the cursor past the ``n`` tokens the last step wrote."""
        self.cursor.add_(n)
        self.length += n

    def nbytes(self) -> int:
        """Bytes held by the cached tokens (not the spare capacity)."""
        return sum(buf[:, : self.length].numel() * buf.element_size() for layer in self.layers
                   for buf in layer.buffers)
