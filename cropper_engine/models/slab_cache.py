"""A preallocated KV cache for grouped sampling, where rows split and finish as they decode.

transformers' DynamicCache grows by concatenation (the whole cache copied at every step) and
re-indexes rows with `index_select` (the whole cache copied again). Here each layer's keys and
values live in one slab [rows_cap, heads, len_cap, dim] allocated once; a step writes its token
in place, and the live rows are always slots 0..n-1. Changing the rows moves only the rows that
change: a sample group that splits off is copied into a new slot at the end, a finished row's
slot is filled by the last row. The model sees views of the live region.
"""

from __future__ import annotations

from typing import Any


def slab_cache(cache: Any, rows_cap: int, len_cap: int) -> Any:
    """A DynamicCache whose layers are slabs holding `cache`'s content (prefill KV); the slabs
    start with `rows_cap` rows and grow if more rows go live."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        def __init__(self, keys: Any, values: Any) -> None:
            super().__init__()
            b, h, t, d = keys.shape
            self.dtype, self.device = keys.dtype, keys.device
            # never read beyond the live rows and the filled length: no need to zero them
            self.k = keys.new_empty((rows_cap, h, len_cap, d))
            self.v = values.new_empty((rows_cap, h, len_cap, d))
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

        def move_rows(self, src: Any, dst: Any, n: int) -> None:
            if n > self.k.shape[0]:  # more live rows than slots: grow (rare at low temperatures)
                cap = max(n, 2 * self.k.shape[0])
                for name in ("k", "v"):
                    old = getattr(self, name)
                    new = old.new_empty((cap, *old.shape[1:]))
                    new[: self.n, :, : self.length] = old[: self.n, :, : self.length]
                    setattr(self, name, new)
            if len(src):
                t = self.length
                self.k[dst, :, :t] = self.k[src, :, :t]
                self.v[dst, :, :t] = self.v[src, :, :t]
            self.n = n

    layers = [SlabLayer(layer.keys, layer.values) for layer in cache.layers]
    out = DynamicCache()
    out.layers = layers
    return out


def move_rows(cache: Any, src: list[int], dst: list[int], n: int) -> None:
    """Copy rows src -> dst (slots) in every layer, then keep n live rows."""
    import torch

    if src:
        device = cache.layers[0].k.device
        s = torch.tensor(src, device=device)
        d = torch.tensor(dst, device=device)
    else:
        s = d = []
    for layer in cache.layers:
        layer.move_rows(s, d, n)
