"""The VLM rounds of `Cropper` (a mixin, engine/loop.py).

`_run_vlm` builds each job's prompt (examples fitted to the context, engine/budget.py), asks the
VLM for all jobs of the batch in one call per round, parses and constrains the boxes
(`_add_vlm_boxes`), scores them, and refines them for `vlm.rounds` rounds; round 0 is retried
once, then a job still without a usable box goes to the no-VLM default. `_generate` calls the
backend and counts tokens, `_record` keeps prompts and answers, `answer_limit` sizes the answer.
"""

from __future__ import annotations

import time
from typing import Any

from cropper_engine.engine.geometry import dedupe
from cropper_engine.engine.job import PIPELINE_FALLBACK, PIPELINE_VLM, BatchContext, Job
from cropper_engine.engine.parse import parse_boxes
from cropper_engine.engine.prompt import PromptSpec, build_messages, render_text
from cropper_engine.models.base import GenerationParams
from cropper_engine.types import Box, Candidate, Task


class VlmRoundsMixin:
    """The VLM rounds of `Cropper`, which provides `cfg`, `vlm`, `scorer`, `templates`, `zero_shot`,
    `record_prompts`, `vlm_stage_times`, `_score`, `_constrain` (ConstrainMixin) and `_default_crop`
    (NoVlmMixin)."""

    def _run_vlm(self, jobs: list[Job], batch: BatchContext, timings: dict[str, float], t: float) -> float:
        from cropper_engine.engine.budget import fit_to_context
        from cropper_engine.engine.grammar import BoxGrammar

        sal = batch.saliency
        cfg = self.cfg.vlm
        n_boxes = 1 if cfg.parallel else cfg.candidates
        grammar = BoxGrammar(boxes=n_boxes)
        params = GenerationParams(
            n=cfg.candidates if cfg.parallel else 1,
            max_new_tokens=cfg.max_new_tokens * n_boxes if cfg.max_new_tokens else self.answer_limit(grammar),
            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
            grammar=grammar if cfg.constrained else None,
        )

        def tick(stage: str, t0: float) -> float:
            t1 = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + (t1 - t0)
            return t1

        for job in jobs:
            w, h = job.size
            job.spec = PromptSpec(job.task, job.image.image, w, h, job.examples, n_boxes, job.ratio,
                                  job.subject if job.task is Task.SUBJECT else None,
                                  query_uuid="q-" + job.image.uid, query_name=str(job.image.path))
            # fewer examples if S would not fit the context
            job.spec, note = fit_to_context(job.spec, self.templates, self.vlm, cfg.candidates, cfg.rounds,
                                            params.max_new_tokens, self._scorer_words(job))
            if note:
                job.notes.append(note)
            if not job.spec.examples:
                why = "S=0" if self.cfg.retrieval.examples == 0 else (
                    "no example index" if self.zero_shot else "no example could be shown")
                job.notes.append(f"zero-shot: the VLM was shown no examples ({why})")
            if self.record_prompts:
                job.prompts = []
        t = tick("prompt", t)

        # round 0 with one retry, then the classical fallback for jobs still without boxes
        pending = list(jobs)
        for attempt in range(1 + max(self.cfg.loop.retries, 0)):
            if not pending:
                break
            convs = [build_messages(j.spec, self.templates) for j in pending]  # type: ignore[arg-type]
            t = tick("prompt", t)
            gens = self._generate(convs, params, attempt, pending, 0)
            t = tick("generate", t)
            self._record(pending, convs, gens, 0, attempt)
            still = []
            for job, gen in zip(pending, gens, strict=True):
                added = self._add_vlm_boxes(job, gen, 0, n_boxes)
                if not added:
                    job.notes.append(f"round 0 attempt {attempt + 1}: no usable box")
                    still.append(job)
            pending = still
        vlm_jobs = [j for j in jobs if j not in pending]
        if vlm_jobs:
            self._score(vlm_jobs, [sal[j.req] for j in vlm_jobs], only_round=0)
            t = tick("score", t)
        if pending:  # the VLM's answers were unusable twice: the no-VLM default crops these
            t = self._default_crop(pending, PIPELINE_FALLBACK, batch, tick, t)

        active = [j for j in jobs if j.pipeline == PIPELINE_VLM]
        for r in range(1, cfg.rounds + 1):
            if not active:
                break
            convs = []
            for job in active:
                prev = sorted(job.round_candidates(r - 1), key=lambda c: -c.score)[: cfg.candidates]
                refine = [(c.box, c.score, c.vlm_score) for c in prev]  # each box as scored, its score
                convs.append(build_messages(job.spec, self.templates, refine,  # type: ignore[arg-type]
                                            self._scorer_words(job)))
            t = tick("prompt", t)
            gens = self._generate(convs, params, r + 10, active, r)
            t = tick("generate", t)
            self._record(active, convs, gens, r, 0)
            for job, gen in zip(active, gens, strict=True):
                if not self._add_vlm_boxes(job, gen, r, n_boxes):
                    job.notes.append(f"round {r}: no usable box; kept round {r - 1}")
                    for c in job.round_candidates(r - 1):  # carry the previous round forward
                        job.candidates.append(Candidate(c.box, c.score, dict(c.scores), r, "carried",
                                                        c.vlm_score))
            self._score(active, [sal[j.req] for j in active], only_round=r)
            t = tick("score", t)
        return t

    def _scorer_words(self, job: Job) -> str:
        """What the refinement prompt says its scores measure (the scorer's terms for the task)."""
        fn = getattr(self.scorer, "prompt_words", None)
        return fn(job.task) if fn is not None else "the scorer"

    def _generate(self, convs: list[Any], params: GenerationParams, salt: int, jobs: list[Job],
                  round_idx: int) -> list[Any]:
        from cropper_engine.models.base import Generation

        p = GenerationParams(**{**params.__dict__, "seed": (params.seed or 0) + salt})
        inner = getattr(self.vlm, "stage_times", None)
        before = dict(inner) if inner is not None else {}
        try:
            gens = self.vlm.generate(convs, p)  # type: ignore[union-attr]
        except Exception as exc:
            for job in jobs:
                job.notes.append(f"VLM error: {type(exc).__name__}: {exc}")
            return [Generation([]) for _ in convs]
        if inner is not None:  # the backend's own split of the generate time
            for k, v in inner.items():
                self.vlm_stage_times[k] = self.vlm_stage_times.get(k, 0.0) + v - before.get(k, 0.0)
        for job, g in zip(jobs, gens, strict=True):
            job.tokens["prompt"] += g.prompt_tokens
            job.tokens["generated"] += g.generated_tokens
            job.tokens["cached"] += g.cached_tokens or 0
            job.round_tokens.append({"round": round_idx, "prompt": g.prompt_tokens, "generated": g.generated_tokens,
                                     "cached": g.cached_tokens or 0, "shared": g.shared_tokens or 0})
        return gens

    def _record(self, jobs: list[Job], convs: list[Any], gens: list[Any], r: int, attempt: int) -> None:
        """Keep each job's prompt text (images named where they stand) and raw answers."""
        if not self.record_prompts:
            return
        for job, conv, gen in zip(jobs, convs, gens, strict=True):
            if job.prompts is not None:
                cut = list(getattr(gen, "truncated", None) or [])
                job.prompts.append({"round": r, "attempt": attempt + 1, "prompt": render_text(conv),
                                    "answers": list(gen.texts), "cut": cut + [False] * (len(gen.texts) - len(cut))})

    def answer_limit(self, grammar: Any) -> int:
        """max_new_tokens from the model: the longest answer of `grammar` in its tokens + the end
        token (the backend's tokenizer), else its length in characters + 1 (no token is shorter)."""
        fn = getattr(self.vlm, "answer_token_limit", None)
        return int(fn(grammar)) if fn is not None else len(grammar.longest()) + 1

    def _add_vlm_boxes(self, job: Job, gen: Any, r: int, n_boxes: int) -> int:
        w, h = job.size
        boxes: list[Candidate] = []
        job.notes.extend(getattr(gen, "notes", None) or [])  # what the backend changed (a sampling fallback)
        cut = list(getattr(gen, "truncated", None) or []) + [False] * len(gen.texts)
        if any(cut[:len(gen.texts)]):  # never parsed: a box cut short reads as other numbers
            job.notes.append(f"round {r}: {sum(cut[:len(gen.texts)])} of {len(gen.texts)} answers "
                             "cut at the token limit, not used")
        for text, was_cut in zip(gen.texts, cut, strict=False):
            if was_cut:
                continue
            parsed = parse_boxes(text, n_boxes)
            for pb in parsed.boxes:
                box = self._constrain(job, Box.from_norm(pb.as_tuple(), w, h))
                if box is not None:
                    boxes.append(Candidate(box, round=r, source="vlm", vlm_score=pb.s))
            if parsed.repairs and parsed.repairs != [f"0 of {n_boxes} boxes"]:
                job.notes.append(f"round {r} parse: {'; '.join(parsed.repairs)}")
        keep = dedupe([c.box for c in boxes], self.cfg.loop.nms_iou)
        job.candidates.extend(boxes[i] for i in keep)
        job.distinct[r] = {"round": r, "boxes": len(boxes), "distinct": len(keep)}
        return len(keep)
