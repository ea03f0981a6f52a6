"""Grouped sampling as a tree decode for the transformers backend (a mixin of `TransformersVLM`).

Each prompt is prefilled once (`_prefill`; a prompt that extends one seen before reuses its KV for
the shared prefix: prefix_store.py), then its n samples decode as branches of that one sequence
(`_decode_grouped`): one row per distinct partial answer, a 4D mask that lets each row see the
prompt and its own branch, the KV in a slab allocated once (slab_cache.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cropper_engine.models.base import GenerationParams
from cropper_engine.models.hf_attention import window_mask
from cropper_engine.models.prefix_store import image_keys


class TreeDecodeMixin:
    """The tree decode of `TransformersVLM`, which provides `model`, `tokenizer`, `device`,
    `eos_token_ids`, `pad_token_id`, `window`, `_rope_index`, `prefix_store`, `_trace`, the counters
    (`decode_row_steps`, `last_cached`, `prefix_tokens_reused`, `prompt_tokens_seen`),
    `_feature_kwargs`, `_image_token_id` and `_tick`."""

    def _decode_grouped(self, inputs: Any, params: GenerationParams, n: int) -> list[list[int]]:
        """n samples per prompt, decoding each distinct partial answer once, as a tree.

        Samples that share a prefix share its next-token distribution, so one row per distinct
        prefix, drawing as many tokens (with replacement) as samples it carries, gives exactly
        n independent samples. At the low temperatures the loop uses, the n samples mostly agree:
        a prompt decodes in one or two rows instead of n.
        Each prompt stays ONE sequence in the KV cache, its rows branches of a tree after the
        prompt: a step feeds every live row's last token as one query of its prompt's sequence,
        and a 4D mask lets each query see the prompt and its own branch's tokens only. The rows
        of a prompt read its KV once, and a row that splits off copies nothing. The KV lives in a
        slab allocated once (`slab_cache`); a step writes its tokens in place.
        Returns n token lists per prompt (prompt-major), each ending at EOS or the token limit.
        """
        import torch

        from cropper_engine.models.slab_cache import slab_cache

        impl = str(getattr(self.model.config, "_attn_implementation", "") or "")
        if "flash" in impl:  # caught by the caller, which samples through transformers' generate
            raise NotImplementedError(f"tree decoding needs an attention that takes a 4D mask, not {impl}")
        window = self.window
        if window is not None and self._rope_index is not None:
            raise NotImplementedError("a sliding window with multimodal rotary positions")
        ids = inputs["input_ids"]
        dev = ids.device
        cache, logits, row_mask, row_pos = self._prefill(inputs)
        t_decode = time.perf_counter()
        b, t_prompt = row_mask.shape
        gen_cap = params.max_new_tokens * n  # tree slots: a step adds at most n rows per prompt
        cache = slab_cache(cache, b, t_prompt + gen_cap)
        prompt_mask = row_mask.bool()
        # the prompt's keys at their positions (real tokens are consecutive: prefix, then the rest)
        key_pos = prompt_mask.long().cumsum(-1) - 1
        slot_step = torch.zeros(gen_cap, dtype=torch.long, device=dev)  # the step that filled a tree slot
        eos = set(self.eos_token_ids)
        compiled = None
        if params.grammar is not None:
            from cropper_engine.engine.grammar import compile_constraint

            compiled = compile_constraint(self.tokenizer, params.grammar, self.eos_token_ids)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(params.seed or 0))
        # one entry per live row: (prompt, tokens so far, samples carried, grammar state)
        rows: list[tuple[int, list[int], int, Any]] = [
            (i, [], n, params.grammar.start() if params.grammar is not None else None) for i in range(b)]
        seen = torch.zeros((b, gen_cap), dtype=torch.bool, device=dev)  # per row: its branch's slots
        used = 0  # tree slots filled
        done: list[list[list[int]]] = [[] for _ in range(b)]
        self.decode_row_steps = 0
        for step in range(params.max_new_tokens):
            self.decode_row_steps += len(rows)
            if self._trace is not None:
                self._trace.extend((p, list(toks), logits[r]) for r, (p, toks, _, _) in enumerate(rows))
            scores = logits / float(params.temperature) if params.temperature > 0 else logits
            if compiled is not None:
                keys = [-1 if st is None else st for _, _, _, st in rows]
                masks = {k: compiled.mask(k, scores.shape[-1], scores) for k in set(keys)}
                scores = scores + torch.stack([masks[k] for k in keys])
            probs = torch.softmax(scores, dim=-1)
            if params.top_p < 1.0:
                probs = _top_p(probs, params.top_p)
            last = step == params.max_new_tokens - 1
            most = max(count for _, _, count, _ in rows)
            # one draw for all rows; a row carrying c samples uses its first c draws
            if params.temperature > 0:
                drawn_all = torch.multinomial(probs.cpu(), most, replacement=True, generator=gen).tolist()
            else:  # greedy: every sample takes the argmax
                drawn_all = [[t] * most for t in probs.argmax(-1).tolist()]
            parents: list[int] = []
            children: list[tuple[int, list[int], int, Any]] = []
            for r, (prompt, toks, count, state) in enumerate(rows):
                drawn = drawn_all[r][:count]
                for tok in sorted(set(drawn)):
                    c = drawn.count(tok)
                    seq = [*toks, tok]
                    if tok in eos or last or (params.stop and self._hits_stop(seq, params.stop)):
                        done[prompt].extend([seq] * c)
                        continue
                    st = compiled.allowed(state)[1].get(tok) if compiled is not None and state is not None else state
                    parents.append(r)
                    children.append((prompt, seq, c, st))
            if not children:
                break
            # each prompt's live rows are queries 0..q-1 of its sequence at this step
            per_prompt = [0] * b
            slot = []
            for prompt, _, _, _ in children:
                slot.append(per_prompt[prompt])
                per_prompt[prompt] += 1
            q = max(per_prompt)
            p_idx = torch.tensor([c[0] for c in children], device=dev)
            q_idx = torch.tensor(slot, device=dev)
            seen = seen.index_select(0, torch.tensor(parents, device=dev))
            seen[torch.arange(len(children), device=dev), used + q_idx] = True
            tree = torch.zeros((b, q, used + q), dtype=torch.bool, device=dev)
            tree[p_idx, q_idx] = seen[:, : used + q]  # unused queries see the prompt alone
            visible = prompt_mask
            if window is not None:  # the query is at position row_pos + step + 1; it sees `window` back
                slot_step[used: used + q] = step
                tree &= (step - slot_step[: used + q] < window)[None, None, :]
                qs = torch.arange(q, device=dev)
                tree[:, qs, used + qs] = True  # each query sees itself: no row is fully masked
                visible = prompt_mask & (key_pos > (row_pos + step + 1 - window)[:, None])
            mask = torch.cat([visible[:, None, :].expand(b, q, t_prompt), tree], dim=2)[:, None]
            tokens = torch.full((b, q), self.pad_token_id, dtype=ids.dtype, device=dev)
            tokens[p_idx, q_idx] = torch.tensor([c[1][-1] for c in children], dtype=ids.dtype, device=dev)
            positions = (row_pos + step + 1)[:, None].expand(b, q)
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=q)
            logits = out.logits[p_idx, q_idx].float()
            rows = children
            used += q
        self._tick("decode", t_decode)
        return [seq for per in done for seq in per]

    def _prefill(self, inputs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
        """Run the prompts; returns (KV cache, last logits, attention mask, last positions).

        With cached image features, a prompt that extends one seen before (a refinement round
        extends round 0: instruction, examples and query come first) reuses that prompt's KV
        for the shared prefix and runs only the rest (`PrefixStore`).
        """
        import torch

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        feats, counts, uuids = inputs.get("_feats"), inputs.get("_counts"), inputs.get("_uuids")
        extra = {k: v for k, v in inputs.items() if not k.startswith("_") and k not in ("input_ids", "attention_mask")}
        rows = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
        t0 = time.perf_counter()
        plan = keys = None
        self.last_cached = [0] * len(rows)
        if counts is not None and self.prefix_store is not None and self._rope_index is None:
            keys = [image_keys(r, u, self._image_token_id()) for r, u in zip(rows, uuids, strict=True)]
            plan = self.prefix_store.plan(rows, keys, self._image_token_id())
        if plan is None:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            row_pos = positions[:, -1]
            if self._rope_index is not None and extra.get("image_grid_thw") is not None:
                # 3-D positions [3, B, T]; the answer continues after the largest of a row's positions
                positions = self._rope_index(ids, mask, extra)
                row_pos = positions.amax(dim=(0, 2))
            if counts is not None:
                extra.update(self._feature_kwargs(ids, feats))
            if self.window is not None:  # a cache of full layers: keep every token's KV for the decode
                from transformers import DynamicCache

                extra["past_key_values"] = DynamicCache()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **extra)
            cache, t = out.past_key_values, ids.shape[1]
            spans = [[(t - len(r), t)] for r in rows]
            row_mask = mask
        else:
            cache, feed, row_mask, pos, spans = plan.build(self.pad_token_id, self.device)
            # the images of the part that runs: each row's images after those inside its prefix
            if feats is not None:
                keep, start = [], 0
                for c, skip in zip(counts, plan.prefix_images, strict=True):
                    keep.extend(range(start + skip, start + c))
                    start += c
                extra.update(self._feature_kwargs(feed, feats[keep] if keep else None))
            # with a window the gap between the stored prefix and the rest must not count as distance
            fwd_mask = row_mask if self.window is None else window_mask(row_mask, feed.shape[1], self.window)
            out = self.model(input_ids=feed, attention_mask=fwd_mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1, **extra)
            cache = out.past_key_values
            row_pos = pos[:, -1]
            self.prefix_tokens_reused += plan.reused
            self.last_cached = list(plan.lengths)
        self.prompt_tokens_seen += sum(len(r) for r in rows)
        if self.prefix_store is not None and keys is not None:
            # keep prompts that are mostly new (round 0); a refinement prompt adds nothing a later
            # round could reuse beyond the round-0 prefix it already shares
            fresh = [i for i, r in enumerate(rows) if plan is None or plan.lengths[i] < len(r) // 2]
            self.prefix_store.add([keys[i] for i in fresh], cache, [spans[i] for i in fresh], rows=fresh)
        logits = out.logits[:, -1, :].float()
        del out
        self._tick("prefill", t0)
        return cache, logits, row_mask, row_pos.clone() if isinstance(row_pos, torch.Tensor) else row_pos

    def _hits_stop(self, seq: list[int], stop: Sequence[str]) -> bool:
        text = self.tokenizer.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return any(s and s in text for s in stop)


def _top_p(probs: Any, top_p: float) -> Any:
    """Nucleus filtering of probability rows (renormalised)."""
    import torch

    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Drop a stop string and what follows, as vLLM does (transformers keeps it)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text
