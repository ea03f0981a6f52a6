"""The small protocols every backend implements, and the registry that finds them by name.

- Embedder: images -> [N, D] float32, L2-normalised rows; `id` names the model and its
  weights exactly (an index built with one embedder refuses another).
- VLM: a batch of multi-image conversations -> n sampled texts each.
- Scorer: prepare (CPU) / forward (device) / finish (CPU), so preprocessing can overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cropper_engine.errors import InputError


@runtime_checkable
class Embedder(Protocol):
    id: str
    dim: int

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (RGB) -> float32 [N, dim], each row of unit length."""
        ...

    def describe(self) -> dict[str, Any]:
        """What an index manifest records: id, dim, and the preprocessing."""
        ...


@runtime_checkable
class TensorEmbedder(Embedder, Protocol):
    """An embedder that also runs on device tensors, for fused crop scoring."""

    input_size: int
    device: str

    def encode_pixels(self, pixels: Any) -> Any:
        """torch float [N, 3, input_size, input_size] in 0..1 -> torch [N, dim], unit rows."""
        ...


@dataclass
class ImagePart:
    """An image inside a conversation; `uuid` is stable for images that recur (examples).

    With `box` (pixels x1, y1, x2, y2) the part is that region of `image`: backends cut and
    resize it in one step instead of copying the crop at full resolution first. `name` says
    which image it is in a saved prompt (`crop --save-prompts`); backends ignore it.
    """

    image: Any  # PIL.Image.Image
    uuid: str | None = None
    box: tuple[int, int, int, int] | None = None
    name: str | None = None

    def pil(self) -> Any:
        """The image as PIL, the region cut out."""
        return self.image if self.box is None else self.image.crop(self.box)

    @property
    def size(self) -> tuple[int, int]:
        if self.box is None:
            return self.image.size
        x1, y1, x2, y2 = self.box
        return (x2 - x1, y2 - y1)


@dataclass
class Message:
    role: str  # "user" | "assistant" | "system"
    content: list[str | ImagePart] = field(default_factory=list)

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]


Conversation = list[Message]


def chat_messages(conversation: Conversation, image_item: Callable[[ImagePart], dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Our conversation as OpenAI-style chat messages; `image_item` renders one image part."""
    out = []
    for msg in conversation:
        content: list[dict[str, Any]] = []
        for part in msg.content:
            if isinstance(part, ImagePart):
                content.append(image_item(part))
            elif isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                raise InputError(f"a message part must be text or an ImagePart, got {type(part).__name__}")
        out.append({"role": msg.role, "content": content})
    return out


@dataclass
class GenerationParams:
    n: int = 6
    max_new_tokens: int = 64
    temperature: float = 0.05
    top_p: float = 1.0
    seed: int | None = 0
    grammar: Any = None  # a cropper_engine.engine.grammar.BoxGrammar, or None for free text
    stop: list[str] = field(default_factory=list)


@dataclass
class Generation:
    """n sampled texts for one conversation, with token counts for the benchmarks."""

    texts: list[str]
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens served from a prefix cache (vLLM with n > 1:
    # its count also includes the n samples reusing their own prompt's blocks)
    shared_tokens: int | None = None  # prompt tokens shared with an earlier prompt (cacheable)
    truncated: list[bool] = field(default_factory=list)  # per text: ended by the token limit (empty: unknown)
    notes: list[str] = field(default_factory=list)  # what the backend did differently (a sampling fallback)


@runtime_checkable
class VLM(Protocol):
    """A VLM backend. It may also say `image_edge`: the longest image side it reads (the engine
    then decodes example images no larger)."""

    id: str

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Generation]:
        ...


# --- registry ---------------------------------------------------------------------------


@dataclass
class Registry:
    """Factories found by name; error messages list what is registered."""

    kind: str
    factories: dict[str, Callable[..., Any]] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.factories[name] = fn
            self.help[name] = help
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self.factories)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self.factories[name]
        except KeyError:
            raise InputError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
