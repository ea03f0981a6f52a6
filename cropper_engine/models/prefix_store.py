"""Prefix KV reuse for the transformers backend: the KV of recent prompts, serving the prefix a new
prompt shares with one of them (a refinement round's prompt extends its round-0 prompt). Images
are compared by identity (`image_keys`); `PrefixPlan` runs a batch on top of the stored prefixes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MIN_PREFIX = 16  # shorter shared prefixes are not worth a cache rebuild


@dataclass
class PrefixPlan:
    """How a batch runs on top of stored prefixes: row i = [pad][prefix_i KV][pad][rest_i]."""

    entries: list[Any]  # per row: the matched PrefixEntry, or None
    lengths: list[int]  # per row: tokens reused from the entry
    rows: list[list[int]]  # per row: the whole prompt's token ids
    prefix_images: list[int]  # per row: images inside the reused prefix

    @property
    def reused(self) -> int:
        return sum(self.lengths)

    def build(self, pad_id: int, device: Any) -> tuple[Any, Any, Any, Any, list[list[tuple[int, int]]]]:
        """(cache, ids to run [B, S], attention mask [B, C+S], positions [B, S], real spans per row)."""
        import torch
        from transformers import DynamicCache

        b = len(self.rows)
        c = max(self.lengths)
        rest = [len(r) - n for r, n in zip(self.rows, self.lengths, strict=True)]
        s = max(rest)
        ref = next(e for e in self.entries if e is not None)
        cache = DynamicCache()
        for layer, (k0, v0) in enumerate(ref.kv):
            k = k0.new_zeros((b, k0.shape[0], c, k0.shape[2]))
            v = v0.new_zeros((b, v0.shape[0], c, v0.shape[2]))
            for i, (e, n) in enumerate(zip(self.entries, self.lengths, strict=True)):
                if e is not None and n:
                    k[i, :, c - n:] = e.kv[layer][0][:, :n]
                    v[i, :, c - n:] = e.kv[layer][1][:, :n]
            cache.update(k, v, layer)
        feed = torch.full((b, s), pad_id, dtype=torch.long)
        mask = torch.zeros((b, c + s), dtype=torch.long)
        pos = torch.zeros((b, s), dtype=torch.long)
        spans = []
        for i, (r, n, m) in enumerate(zip(self.rows, self.lengths, rest, strict=True)):
            feed[i, s - m:] = torch.tensor(r[n:])
            mask[i, c - n:c] = 1
            mask[i, c + s - m:] = 1
            pos[i, s - m:] = torch.arange(n, len(r))
            spans.append([(c - n, c), (c + s - m, c + s)])
        return cache, feed.to(device), mask.to(device), pos.to(device), spans


def _prefix_budget(device: str) -> int:
    """Bytes the prefix store may hold: a quarter of the GPU's memory, 2 GiB on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(0.25 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return 2 << 30


def image_keys(ids: list[int], uuids: list[str | None], image_token: int | None) -> Any:
    """Token ids with each image's placeholder tokens replaced by a key of that image.

    Two prompts share a prefix only if their images are the same too: the `<image>` tokens of
    different pictures are equal ids with different content. An image without a uuid gets a
    key that matches nothing.
    """
    import numpy as np

    keys = np.asarray(ids, dtype=np.int64).copy()
    if image_token is None or not uuids:
        return keys
    is_img = keys == image_token
    starts = np.flatnonzero(is_img & ~np.concatenate([[False], is_img[:-1]]))
    ends = np.flatnonzero(is_img & ~np.concatenate([is_img[1:], [False]])) + 1
    for j, (a, z) in enumerate(zip(starts, ends, strict=True)):
        u = uuids[j] if j < len(uuids) else None
        h = int.from_bytes(hashlib.blake2b((u or uuid.uuid4().hex).encode(), digest_size=7).digest(), "big")
        keys[a:z] = -1 - h  # negative: never a real token id
    return keys


def _lcp(a: Any, b: Any) -> int:
    """The length of the common prefix of two numpy arrays."""
    import numpy as np

    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class PrefixEntry:
    ids: Any  # numpy int64 [T]
    kv: list[tuple[Any, Any]]  # per layer (keys [H, T, D], values [H, T, D])
    nbytes: int


class PrefixStore:
    """The KV of recent prompts, to serve the prefix a new prompt shares with one of them.

    Bounded by bytes (LRU). A refinement round's prompt extends its round-0 prompt, so most of
    its tokens (instruction, examples, query) are read from here instead of being recomputed.
    """

    def __init__(self, max_bytes: int = 2 << 30, max_entries: int = 64) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self.bytes = 0
        self._next = 0

    def _match(self, ids: Any) -> tuple[PrefixEntry | None, int, int | None]:
        import numpy as np

        best: tuple[PrefixEntry | None, int, int | None] = (None, 0, None)
        for key, e in self.entries.items():
            n = min(len(e.ids), len(ids))
            diff = np.flatnonzero(e.ids[:n] != ids[:n])
            lcp = int(diff[0]) if len(diff) else n
            if lcp > best[1]:
                best = (e, lcp, key)
        return best

    def plan(self, rows: list[list[int]], keys: list[Any], image_token: int | None) -> PrefixPlan | None:
        """Match each row's key sequence (`image_keys`) against the stored prompts."""
        import numpy as np

        entries, lengths, images = [], [], []
        for r, k in zip(rows, keys, strict=True):
            ids = np.asarray(r, dtype=np.int64)
            e, n, key = self._match(k)
            n = min(n, len(r) - 1)  # at least one token runs, for the next-token logits
            if image_token is not None:  # never cut through an image's tokens
                while 0 < n < len(r) and r[n] == image_token and r[n - 1] == image_token:
                    n -= 1
            if e is None or n < MIN_PREFIX:
                e, n = None, 0
            elif key is not None:
                self.entries.move_to_end(key)
            entries.append(e)
            lengths.append(n)
            if image_token is None:
                images.append(0)
            else:
                prefix = ids[:n] == image_token
                images.append(int(np.count_nonzero(prefix[1:] & ~prefix[:-1]) + int(prefix[:1].sum())))
        if not any(lengths):
            return None
        return PrefixPlan(entries, lengths, rows, images)

    def add(self, keys: list[Any], cache: Any, spans: list[list[tuple[int, int]]],
            rows: list[int] | None = None) -> None:
        """Keep prompts' KV (their real columns of `cache`, in order) under their key sequences;
        `rows` are their batch rows in `cache` (default 0..n-1)."""
        import numpy as np
        import torch

        layers = [(layer.keys, layer.values) for layer in cache.layers]
        ends = [z for sp in spans for _, z in sp]
        if ends and any(k.shape[2] < max(ends) for k, _ in layers):
            return  # a cache that dropped tokens (a sliding window's): its KV would not match the ids
        for i, r, sp in zip(rows if rows is not None else range(len(keys)), keys, spans, strict=True):
            kv = []
            for k, v in layers:
                kv.append((torch.cat([k[i, :, a:z] for a, z in sp], dim=1).clone(),
                           torch.cat([v[i, :, a:z] for a, z in sp], dim=1).clone()))
            nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            if nbytes > self.max_bytes:
                continue
            self.entries[self._next] = PrefixEntry(np.asarray(r, dtype=np.int64), kv, nbytes)
            self._next += 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
