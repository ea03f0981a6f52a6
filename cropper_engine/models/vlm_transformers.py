"""The transformers VLM backend: multi-image chat models (Idefics2 / Mantis, Idefics3 / SmolVLM,
Qwen2.5-VL) run in-process.

Loads offline only: a local folder, or a hub id already in the local Hugging Face cache.
Conversations are batched (left padding); each prompt is prefilled once and its `params.n`
samples decode as branches of that one sequence (grouped sampling, `_decode_grouped`);
`params.grammar` (a BoxGrammar) constrains decoding.
Models with multimodal rotary positions (Qwen2-VL / Qwen2.5-VL) decode at the positions their
`get_rope_index` gives, and run their images through the vision tower on every call (no cached
image features, no prefix reuse).

`TransformersVLM` loads the model and runs `generate` with its fallbacks (the tree decode, a shared
prefill, transformers' own generate); its other jobs live beside it: image_features.py (prompt
inputs and cached image features, `ImageFeatureMixin`), tree_decode.py (the tree decode,
`TreeDecodeMixin`), prefix_store.py (prefix KV reuse) and hf_attention.py (the sliding window,
multimodal rotary positions, the CPU attention). The names that moved are re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cropper_engine.errors import InputError, ModelNotFoundError
from cropper_engine.models.base import Conversation, Generation, GenerationParams, ImagePart
from cropper_engine.models.hf_attention import (  # noqa: F401  (re-exported: the names this module had)
    GQA_ATTENTION,
    _rope_index_fn,
    _sdpa_gqa,
    _use_gqa_attention,
    sliding_window,
    window_mask,
)
from cropper_engine.models.image_features import ImageFeatureMixin, _conversation_to_chat  # noqa: F401
from cropper_engine.models.images import ImageFitter, longest_edge, max_pixels
from cropper_engine.models.prefix_store import (  # noqa: F401  (re-exported: the names this module had)
    MIN_PREFIX,
    PrefixEntry,
    PrefixPlan,
    PrefixStore,
    _lcp,
    _prefix_budget,
    image_keys,
)
from cropper_engine.models.tree_decode import TreeDecodeMixin, _cut_at_stop, _top_p  # noqa: F401

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def hf_hub_cache() -> Path:
    """The hub cache folder (models/hub_cache.py: the registry's lookup too)."""
    from cropper_engine.models.hub_cache import hub_cache_dir

    return hub_cache_dir()


def resolve_model_dir(model: str | os.PathLike[str]) -> Path:
    """A local folder, or the cached snapshot of a hub id; never goes online.

    Raises ModelNotFoundError at once, saying how to get the weights, when neither exists.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder {text!r} does not exist; pass a folder with config.json "
                                     "(e.g. one made by `huggingface-cli download`) or a cached hub id")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {text!r} has no config.json: it is not a saved "
                                     "transformers model (point at the folder that holds config.json)")
        return path
    from cropper_engine.models.registry import MODELS, cached_snapshot

    spec = MODELS.get(text.lower())
    hub_id = spec.hub_id if spec is not None else text
    found = cached_snapshot(hub_id, spec.revision if spec is not None else None) if "/" in hub_id else None
    if found is None:
        cache = hf_hub_cache()
        raise ModelNotFoundError(
            f"model {text!r} is neither a local folder nor in the Hugging Face cache at {cache}, and this "
            f"engine never downloads. On a machine with internet run `huggingface-cli download {hub_id}` "
            f"(or `hf download {hub_id}`), then copy its cache folder ({cache.name}/models--"
            f"{hub_id.replace('/', '--')}) into {cache} (or set HF_HOME / HF_HUB_CACHE to where it is), "
            "or pass the downloaded model folder itself as the model path."
        )
    return found


class TransformersVLM(ImageFeatureMixin, TreeDecodeMixin):
    """A VLM backend on transformers' AutoProcessor + AutoModelForImageTextToText."""

    def __init__(self, model: str | os.PathLike[str], device: str = "auto", dtype: str | Any = "auto",
                 batch_size: int = 8, sampling: str = "grouped", attention: str = "auto",
                 prefix_cache: bool = True, preloaded: Any = None, spec: Any = None,
                 context_length: int | None = None, processor_settings: dict[str, Any] | None = None,
                 vision_chunk: int = 4):
        """`spec` (a registry ModelSpec) gives the trained context and the processor settings;
        `processor_settings` overrides those (default: the registry's for the model's family);
        `context_length` the context prompts must fit; `vision_chunk` images go through the
        vision tower at once."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this engine never downloads
        path = resolve_model_dir(model)  # before importing torch: a missing model fails at once
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else str(device)
        self.dtype = self._torch_dtype(dtype)
        self.batch_size = batch_size
        if sampling not in SAMPLING_MODES:
            raise InputError(f"unknown sampling mode {sampling!r}; choose one of: {', '.join(SAMPLING_MODES)}")
        self.sampling = sampling
        self.decode_row_steps = 0  # rows x steps of the last grouped decode (a cost figure)
        self._trace: list[Any] | None = None  # tests: (prompt, tokens, next-token logits) per row-step
        self.feature_cache_size = 256
        self._features: OrderedDict[str, Any] = OrderedDict()
        self._feature_mode: str | None = None
        self._image_text: str | None = None  # an image's tokens as text, for processors that need pixels
        self.image_cache_hits = self.image_cache_misses = 0
        self.prefix_store: PrefixStore | None = PrefixStore(2 << 30) if prefix_cache else None
        self.vision_chunk = max(1, int(vision_chunk))
        self.notes: list[str] = []  # what the backend changed about the snapshot (a chat template)
        # why sampling left the grouped tree decode (None while it has not): on every row's notes
        self.sampling_note: str | None = None
        self.prefix_tokens_reused = self.prompt_tokens_seen = 0
        self.last_cached: list[int] = []
        self._recent_prompts: deque[Any] = deque(maxlen=512)  # key sequences, for the shared-token count
        self.stage_times: dict[str, float] = {}  # seconds in vision / prefill / decode, accumulated
        self.path = path
        self.id = f"transformers:{model}"
        from cropper_engine.models.hf_compat import version_note

        if version_note():  # outside the range the engine is tested on: said, not refused
            logger.warning("%s", version_note())
            self.notes.append(str(version_note()))

        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"dtype": self.dtype, "local_files_only": True}
        if self.device.startswith("cuda"):
            kwargs["device_map"] = self.device  # load straight onto the GPU
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = preloaded if preloaded is not None else \
                AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            self.processor_settings, note = self._configure_processor(path, spec, processor_settings)
            if note:
                logger.warning("%s: %s", path, note)
                self.notes.append(note)
        except OSError as e:  # a partial download: config.json there, weights or tokenizer not
            raise ModelNotFoundError(f"model {str(model)!r} in {path} is incomplete ({e}); download it "
                                     "again with `huggingface-cli download` on a machine with internet") from e
        if not self.device.startswith("cuda"):
            self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        if attention not in ("auto", "stock"):
            raise InputError(f"unknown attention {attention!r}; choose auto or stock")
        self.attention = "stock"
        if attention == "auto" and self.device == "cpu" and _use_gqa_attention(self.model):
            self.attention = GQA_ATTENTION
        self.load_seconds = time.perf_counter() - t0
        # Multimodal rotary positions (Qwen2-VL / Qwen2.5-VL "mrope"): image tokens get 3-D
        # positions from the model's `get_rope_index`, so prompts cannot be positioned by counting
        # tokens. The tree decoder takes those positions from the model; image features are not
        # cached and the prefix store is bypassed (both assume 1-D positions).
        self._rope_index = _rope_index_fn(self.model)
        # Mistral's sliding window (Idefics2 / Mantis: 4096): a token attends to the last `window`
        # positions, itself included. The prefill, the prefix store and the tree decode keep every
        # token's KV and apply the window in their masks (transformers' own cache drops old KV).
        try:
            self.window = sliding_window(self.model)
        except NotImplementedError as e:  # transformers' generate handles what the tree decode does not
            logger.info("grouped sampling is off: %s; sampling through transformers' generate", e)
            self.window, self.sampling = None, "shared-prefill"
            if sampling == "grouped":
                self.sampling_note = f"grouped sampling off ({e}): sampled through transformers' generate"
        if self._rope_index is not None:
            logger.info("%s uses multimodal rotary positions: grouped sampling takes them from the model's "
                        "get_rope_index; cached image features and prefix reuse are off, and shared-prefill "
                        "sampling repeats prompts as transformers' generate does", type(self.model).__name__)

        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        eou = self.tokenizer.get_vocab().get("<end_of_utterance>")
        if eou is not None and eou not in eos_ids:
            eos_ids.append(eou)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids: list[int] = [int(i) for i in eos_ids]
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = gen.pad_token_id if gen.pad_token_id is not None else self.eos_token_ids[0]
            self.tokenizer.pad_token_id = pad
        self.pad_token_id = int(pad)
        self.longest_edge = longest_edge(self.processor)
        self.image_edge = self.longest_edge  # the longest image side the model reads (None: any)
        self._fit = ImageFitter(self.longest_edge, max_pixels=max_pixels(self.processor))
        from cropper_engine.models.images import PromptCounter
        from cropper_engine.models.registry import context_length as trained_context
        from cropper_engine.models.registry import kv_bytes_per_token

        # tokens per image measured from the processor at these settings (not from a table)
        self._counter = PromptCounter(self.processor)
        self.image_tokens = self._counter.image_tokens
        self.context_length = context_length or trained_context(spec, self.model.config, self.tokenizer)
        if self.prefix_store is not None and self.device.startswith("cuda"):
            # a batch's round-0 prompts at the full context (what `memory_need` counts), at most a
            # quarter of the GPU
            kv = kv_bytes_per_token(self.model.config, self.model.dtype.itemsize)
            self.prefix_store.max_bytes = min(_prefix_budget(self.device),
                                              kv * (self.context_length or 8192) * self.batch_size)

    def _configure_processor(self, path: Path, spec: Any, settings: dict[str, Any] | None
                             ) -> tuple[dict[str, Any], str | None]:
        """The engine's processor settings (registry.PROCESSOR_SETTINGS: image splitting off, a
        pixel budget) set on the processor, and a chat template where the snapshot has none."""
        from cropper_engine.models.images import apply_processor_settings
        from cropper_engine.models.registry import ensure_chat_template, family_of, processor_settings

        if settings is None:
            settings = spec.processor_settings if spec is not None else \
                processor_settings(family_of(getattr(self.model.config, "model_type", None)))
        applied = apply_processor_settings(self.processor, settings)
        return applied, ensure_chat_template(self.processor, path)

    def prompt_token_estimate(self, conversation: Conversation) -> int:
        """The conversation's prompt tokens without its pixels (the token budget, engine/budget.py):
        exact where each image has a fixed count, an upper bound for Qwen2.5-VL."""
        return self._counter(conversation)

    def memory_need(self, context: int | None = None) -> Any:
        """GPU memory this model needs at its batch size and context (registry.memory_need)."""
        from cropper_engine.models.registry import memory_need

        params = sum(p.numel() for p in self.model.parameters())
        return memory_need(self.model.config, context or self.context_length or 8192, self.batch_size,
                           "transformers", self.processor_settings, self.vision_chunk,
                           self.model.dtype.itemsize, params=params)

    def _torch_dtype(self, dtype: str | Any) -> Any:
        import torch

        if dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if isinstance(dtype, torch.dtype):
            return dtype
        name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
        if name is None:
            raise InputError(f"unknown dtype {dtype!r}; choose one of: auto, float32, bfloat16, float16")
        return getattr(torch, name)

    def answer_token_limit(self, grammar: Any) -> int:
        """The token limit an answer of `grammar` needs with this tokenizer (engine/grammar.py)."""
        from cropper_engine.engine.grammar import answer_token_limit

        return answer_token_limit(self.tokenizer, grammar, self.eos_token_ids)

    def count_prompt_tokens(self, conversation: Conversation) -> int:
        return int(self._inputs([conversation])["attention_mask"].sum())

    # --- generation -------------------------------------------------------------------
    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Generation]:
        if params.n < 1:
            raise InputError(f"n must be at least 1, got {params.n}")
        if params.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        import torch

        results: list[Generation | None] = [None] * len(conversations)
        # Conversations with and without images cannot share one processor call.
        has_images = [any(isinstance(p, ImagePart) for m in c for p in m.content) for c in conversations]
        # everything, the vision tower included, without autograd: a cached image feature must not
        # hold its chunk's activations
        with torch.inference_mode():
            for flag in (True, False):
                group = [i for i, h in enumerate(has_images) if h is flag]
                for start in range(0, len(group), self.batch_size):
                    part = group[start:start + self.batch_size]
                    gens = self._generate_batch([conversations[i] for i in part], params)
                    for i, gen in zip(part, gens, strict=True):
                        results[i] = gen
        return [g for g in results if g is not None]

    def _generate_batch(self, conversations: Sequence[Conversation],
                        params: GenerationParams) -> list[Generation]:
        import torch

        sample = params.temperature > 0
        n_run = params.n if sample else 1  # greedy samples are all the same: decode once, copy
        grouped = self.sampling == "grouped"
        if grouped and self._features_supported():
            inputs: Any = self._prepare(conversations)
        else:
            inputs = self._inputs(conversations).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "num_return_sequences": n_run,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "do_sample": sample,
        }
        if sample:
            kwargs.update(temperature=float(params.temperature), top_p=float(params.top_p), top_k=0)
        if params.grammar is not None:
            from cropper_engine.engine.grammar import TokenConstraint

            kwargs["logits_processor"] = [TokenConstraint(self.tokenizer, params.grammar,
                                                          eos_token_ids=self.eos_token_ids)]
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        new: list[list[int]] | None = None
        with torch.inference_mode():
            if grouped:
                try:
                    new = self._decode_grouped(inputs, params, n_run)
                except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError) as e:
                    logger.warning("grouped sampling failed (%s); using transformers' generate", e)
                    self.sampling = "shared-prefill"
                    self.sampling_note = f"grouped sampling failed ({e}): sampled through transformers' generate"
                    kwargs = self._fresh_kwargs(kwargs)
                    inputs = self._inputs(conversations).to(self.device)
                    if "pixel_values" in inputs:
                        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            if new is None:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                sequences = None
                if n_run > 1 and self.sampling == "shared-prefill" and self._can_share_prefill(inputs):
                    try:
                        sequences = self._generate_shared_prefill(inputs, n_run, kwargs)
                    except (TypeError, ValueError, AttributeError, NotImplementedError) as e:
                        # A transformers version without cache continuation: repeat the prompts instead.
                        logger.warning("shared prefill failed (%s); repeating prompts for n samples", e)
                        self.sampling = "hf"
                        self.sampling_note = (f"{self.sampling_note + '; ' if self.sampling_note else ''}"
                                              f"shared prefill failed ({e}): prompts repeated for the samples")
                        if params.seed is not None:
                            torch.manual_seed(params.seed)
                        kwargs = self._fresh_kwargs(kwargs)
                if sequences is None:
                    sequences = self.model.generate(**inputs, **kwargs)
                new = sequences[:, inputs["input_ids"].shape[1]:].tolist()

        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        cached = self.last_cached if grouped and len(self.last_cached) == len(conversations) else \
            [0] * len(conversations)
        shared = self._count_shared(inputs)
        eos = set(self.eos_token_ids)
        results = []
        for b in range(len(conversations)):
            texts, cut, generated = [], [], 0
            for row in new[b * n_run:(b + 1) * n_run]:
                end = next((k + 1 for k, t in enumerate(row) if t in eos), None)
                limited = end is None
                if end is None:  # stopped by the token limit or a stop string: trailing pads are not output
                    end = len(row)
                    while end and row[end - 1] == self.pad_token_id:
                        end -= 1
                generated += end
                text = self.tokenizer.decode(row[:end], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
                stopped = _cut_at_stop(text, params.stop)
                texts.append(stopped)
                cut.append(limited and stopped == text)  # neither the end token nor a stop string
            if n_run != params.n:
                texts, cut = texts * params.n, cut * params.n
            results.append(Generation(texts=texts, prompt_tokens=int(prompt_tokens[b]),
                                      generated_tokens=generated, cached_tokens=int(cached[b]),
                                      shared_tokens=int(shared[b]), truncated=cut,
                                      notes=[self.sampling_note] if self.sampling_note else []))
        return results

    def _count_shared(self, inputs: Any) -> list[int]:
        """Per prompt: its tokens shared with an earlier prompt (images compared by identity, as
        the prefix store does), counted from the prompts' token ids apart from the store, so an
        evicted prefix or a missed lookup shows as a lower hit rate (as the vLLM backend counts)."""
        uuids = inputs.get("_uuids") or [[None]] * len(inputs["input_ids"])  # no uuids: images match nothing
        out = []
        for r, m, u in zip(inputs["input_ids"], inputs["attention_mask"], uuids, strict=True):
            key = image_keys(r[m.bool()].tolist(), u or [None], self._image_token_id())
            out.append(max((_lcp(key, prev) for prev in self._recent_prompts), default=0))
            self._recent_prompts.append(key)
        return out

    @staticmethod
    def _fresh_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        for proc in out.get("logits_processor", []):
            if hasattr(proc, "reset"):
                proc.reset()
        return out

    def _can_share_prefill(self, inputs: Any) -> bool:
        if self._rope_index is not None:  # generate would continue the cache at 1-D positions
            return False
        image_token = getattr(self.model.config, "image_token_id", None)
        return image_token is None or not bool((inputs["input_ids"][:, -1] == image_token).any())

    def _generate_shared_prefill(self, inputs: Any, n: int, kwargs: dict[str, Any]) -> Any:
        """Prefill each prompt once, then copy its KV cache to its n sample rows.

        `num_return_sequences` would repeat the prompts (and run the vision tower on every image) n
        times. Here all but the last prompt token go through the model once, with images; the cache
        is repeated n times, and generate continues from it: the last token (text, never an image)
        starts the n samples.
        """
        import torch

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        # As generate makes them for left padding: positions count real tokens only.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                         use_cache=True, logits_to_keep=1, **extra)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        del out
        rest = {k: v for k, v in kwargs.items() if k != "num_return_sequences"}
        return self.model.generate(input_ids=torch.repeat_interleave(ids, n, dim=0),
                                   attention_mask=torch.repeat_interleave(mask, n, dim=0),
                                   past_key_values=cache, num_return_sequences=1, **rest)

    def _tick(self, stage: str, t0: float) -> None:
        """Add the time since t0 to a stage (CUDA work is awaited first, so the figure is true)."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        self.stage_times[stage] = self.stage_times.get(stage, 0.0) + time.perf_counter() - t0

    def _image_token_id(self) -> int | None:
        tok = getattr(self.processor, "image_token", None)
        tid = getattr(self.model.config, "image_token_id", None)
        if tid is None and tok is not None:
            tid = self.tokenizer.convert_tokens_to_ids(str(tok))
        return tid

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "device": self.device, "dtype": str(self.dtype),
                "batch_size": self.batch_size, "sampling": self.sampling,
                "sampling_note": self.sampling_note,
                "attention": self.attention, "sliding_window": self.window,
                "processor_settings": self.processor_settings, "image_tokens": self.image_tokens,
                "context_length": self.context_length, "notes": list(self.notes)}


SAMPLING_MODES = ("grouped", "shared-prefill", "hf")


__all__ = ["TransformersVLM", "hf_hub_cache", "resolve_model_dir"]
