"""A preallocated KV cache for the tree decode of grouped sampling.

transformers' DynamicCache grows by concatenation: the whole cache is copied at every decode
step. Here each layer's keys and values live in one slab [prompts, heads, len_cap, dim]
allocated once, holding the prefill's KV; a step writes its tokens in place, and the model sees
views of the filled region. Rows never move: the samples of a prompt are branches of its one
sequence (a 4D attention mask says which slots each branch sees).
With a sliding window (Mistral) the slab still holds every token: the prefill runs on a cache of
full layers, and the window is applied by the mask (`hf_attention.window_mask`, and per step
in the tree decode), so no layer drops KV under a branch that still needs it.
"""

from __future__ import annotations

from typing import Any


def _slab_layer_class() -> Any:
    """SlabLayer, made once (it subclasses transformers' DynamicLayer, imported on first use)."""
    global _SLAB_LAYER
    if _SLAB_LAYER is not None:
        return _SLAB_LAYER
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """One layer's keys and values in slabs of `rows` x `len_cap` tokens."""

        def __init__(self, keys: Any, values: Any, rows: int, len_cap: int) -> None:
            super().__init__()
            b, h, t, d = keys.shape
            self.dtype, self.device = keys.dtype, keys.device
            # never read beyond the filled length: no need to zero them
            self.k = keys.new_empty((rows, h, len_cap, d))
            self.v = values.new_empty((rows, h, len_cap, d))
            self.k[:b, :, :t] = keys
            self.v[:b, :, :t] = values
            self.n, self.length = b, t
            self.is_initialized = True

        @property
        def keys(self) -> Any:  # type: ignore[override]
            return self.k[: self.n, :, : self.length]

        @keys.setter
        def keys(self, value: Any) -> None:  # DynamicLayer.__init__ / reset assign these
            pass

        @property
        def values(self) -> Any:  # type: ignore[override]
            return self.v[: self.n, :, : self.length]

        @values.setter
        def values(self, value: Any) -> None:
            pass

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            q = key_states.shape[-2]
            if self.length + q > self.k.shape[2]:
                raise RuntimeError("slab cache is full")
            self.k[: self.n, :, self.length: self.length + q] = key_states
            self.v[: self.n, :, self.length: self.length + q] = value_states
            self.length += q
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    _SLAB_LAYER = SlabLayer
    return SlabLayer


_SLAB_LAYER: Any = None


def slab_cache(cache: Any, rows: int, len_cap: int) -> Any:
    """A DynamicCache whose layers are slabs of `rows` x `len_cap` tokens holding `cache`'s
    content (the prefill's KV, `rows` prompts).

    `cache` is emptied on the way: each of its layers is dropped as soon as its slab holds it, so
    the two copies of the KV never coexist beyond one layer (registry.memory_need counts that).
    """
    from transformers import DynamicCache

    slab_layer = _slab_layer_class()
    source = cache.layers
    cache.layers = []
    layers = []
    while source:
        layer = source.pop(0)
        layers.append(slab_layer(layer.keys, layer.values, rows, len_cap))
        del layer
    out = DynamicCache()
    out.layers = layers
    return out
