"""The token budget: a request's prompts and answers must fit the model's context.

Before the first round the engine counts the longest prompt the loop will send for a job (its
S examples, the query and, when L > 0, a refinement round's R candidate crops with their boxes
and scores) plus the answer's token limit. If that is more than the model's context, the job
runs with fewer examples (the most similar first), and its result row says so: a long prompt
is never sent to be refused, which would send the whole batch to the fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cropper_engine.engine.prompt import PromptSpec, PromptTemplates, build_messages
from cropper_engine.types import Box

SLACK = 4


def fit_to_context(spec: PromptSpec, templates: PromptTemplates, vlm: Any, candidates: int, rounds: int,
                   answer_tokens: int, scorer: str = "aesthetics and area") -> tuple[PromptSpec, str | None]:
    """`spec` with as many of its examples as fit the VLM's context, and a note when it lost some.

    Needs the backend's `context_length` and `prompt_token_estimate(conversation)`; a backend
    without them (or an unknown context) is not checked.
    """
    context = getattr(vlm, "context_length", None)
    estimate = getattr(vlm, "prompt_token_estimate", None)
    if not context or estimate is None:
        return spec, None
    # the refinement prompt shows R crops of the query, with boxes of 3-digit coordinates and the
    # longest scores; a tokenizer that merges digits may spend a token or two more on other
    # numbers: SLACK tokens a crop cover that
    w, h = spec.width, spec.height
    crop = Box(0.123 * w, 0.234 * h, 0.876 * w, 0.987 * h)
    # a score of 0.9975 is shown as 4.99 on the prompt's MOS scale: the longest score text
    refine = [(crop, 0.9975, None)] * candidates if rounds > 0 and candidates else None
    slack = SLACK * len(refine or [])

    def need(k: int) -> int:
        s = dataclasses.replace(spec, examples=spec.examples[:k])
        return int(estimate(build_messages(s, templates, refine, scorer))) + answer_tokens + slack

    s = len(spec.examples)
    if estimate(build_messages(spec, templates, refine)) is None:  # a backend that cannot count
        return spec, None
    full = need(s)
    if full <= context:
        return spec, None
    one = need(1) if s > 1 else full  # (no example adds a zero-shot note: it can cost more than one)
    if one > context:
        bare = need(0)
        if bare > context:
            return dataclasses.replace(spec, examples=[]), (
                f"S lowered from {s} to 0: even without examples the prompt and answer need {bare} tokens, "
                f"over the model's context of {context}")
        return dataclasses.replace(spec, examples=[]), (
            f"S lowered from {s} to 0 to fit the model's context of {context} tokens ({full} needed for S={s})")
    k = 1 + int((context - one) * (s - 1) / max(full - one, 1))  # examples cost about the same each
    k = min(max(k, 1), s - 1)
    while k > 1 and need(k) > context:
        k -= 1
    while k + 1 < s and need(k + 1) <= context:
        k += 1
    return dataclasses.replace(spec, examples=spec.examples[:k]), (
        f"S lowered from {s} to {k} to fit the model's context of {context} tokens "
        f"({full} needed for S={s}: examples, query, {candidates if refine else 0} refinement crops "
        f"and a {answer_tokens}-token answer)")
