"""A cost model of the in-context cropping loop: tokens, FLOPs and bytes per stage, and the
hardware limit they imply. See docs/COST_MODEL.md for the derivation and the full-size table.

    python bench/costmodel.py                      # Mantis-8B-Idefics2 on an H100, the paper's S,T,R,L
    python bench/costmodel.py --device h200 -S 8

Conventions: a multiply-add is 2 FLOPs; bf16 weights are 2 bytes; "limit" is the time the
stage would take at the device's peak (compute-bound stages: FLOPs / peak FLOP/s; decode:
bytes moved / memory bandwidth, whichever is larger).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Idefics2-8B / Mantis-8B-Idefics2 (the published config.json: SigLIP-so400m vision tower at
# 980 px / patch 14, perceiver resampler to 64 latents, Mistral-7B text model).
IDEFICS2_8B = {
    "vision": {"hidden": 1152, "layers": 27, "intermediate": 4304, "patch": 14, "image_size": 980},
    "perceiver": {"latents": 64, "depth": 3, "heads": 16, "head_dim": 96, "kv_heads": 4},
    "text": {"hidden": 4096, "layers": 32, "intermediate": 14336, "heads": 32, "kv_heads": 8,
             "head_dim": 128, "vocab": 32003},
}

# Dense bf16 tensor-core peak and HBM bandwidth (vendor datasheets, SXM parts).
DEVICES = {
    "h100": {"name": "NVIDIA H100 SXM", "flops": 989e12, "bandwidth": 3.35e12},
    "h200": {"name": "NVIDIA H200 SXM", "flops": 989e12, "bandwidth": 4.8e12},
}


@dataclass
class Shape:
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    patch: int
    image_size: int
    latents: int
    perceiver_depth: int
    perceiver_heads: int
    perceiver_head_dim: int
    perceiver_kv_heads: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        v, p, t = d["vision"], d["perceiver"], d["text"]
        return cls(v["hidden"], v["layers"], v["intermediate"], v["patch"], v["image_size"], p["latents"],
                   p["depth"], p["heads"], p["head_dim"], p["kv_heads"], t["hidden"], t["layers"],
                   t["intermediate"], t["heads"], t["kv_heads"], t["head_dim"], t["vocab"])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Shape:
        """From an Idefics2 config.json (as a dict)."""
        v, p, t = cfg["vision_config"], cfg["perceiver_config"], cfg["text_config"]
        heads = t.get("num_attention_heads", 32)
        return cls(
            v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"], v["patch_size"], v["image_size"],
            p.get("resampler_n_latents", 64), p.get("resampler_depth", 3), p.get("resampler_n_heads", 16),
            p.get("resampler_head_dim", 96), p.get("num_key_value_heads", 4),
            t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], heads,
            t.get("num_key_value_heads", heads), t.get("head_dim") or t["hidden_size"] // heads,
            t.get("vocab_size", cfg.get("vocab_size", 32000)))

    # -- parameters ----------------------------------------------------------------------
    def text_params(self) -> float:
        """Non-embedding text parameters + the LM head (what every token multiplies)."""
        attn = self.hidden * (self.heads * self.head_dim) * 2 + self.hidden * (self.kv_heads * self.head_dim) * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp) + self.hidden * self.vocab

    def image_tokens(self) -> int:
        """Prompt tokens per image without splitting: the latents + two <fake_token_around_image>."""
        return self.latents + 2

    # -- FLOPs ---------------------------------------------------------------------------
    def vision_flops(self, side_px: int | None = None) -> float:
        """One image through the vision tower, the modality projection and the perceiver."""
        side = min(side_px or self.image_size, self.image_size)
        n = math.ceil(side / self.patch) ** 2  # patches of a square image at the longest edge
        h, i = self.vision_hidden, self.vision_intermediate
        tower = self.vision_layers * (2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h)
        proj = 2 * n * (2 * h * self.intermediate + self.intermediate * self.hidden)  # SwiGLU to text width
        kv = self.perceiver_kv_heads * self.perceiver_head_dim
        q = self.perceiver_heads * self.perceiver_head_dim
        per = self.perceiver_depth * (
            2 * (n + self.latents) * self.hidden * 2 * kv + 2 * self.latents * self.hidden * 2 * q
            + 4 * self.latents * (n + self.latents) * q + 2 * self.latents * 3 * self.hidden * 4 * self.hidden)
        return tower + proj + per

    def prefill_flops(self, tokens: int, past: int = 0) -> float:
        """`tokens` new prompt tokens after `past` cached ones (causal attention)."""
        linear = 2 * tokens * self.text_params()
        attn = self.layers * 4 * self.heads * self.head_dim * tokens * (past + tokens / 2)
        return linear + attn

    def decode_flops(self, context: int) -> float:
        return 2 * self.text_params() + self.layers * 4 * self.heads * self.head_dim * context

    def decode_bytes(self, rows: int, context: int, dtype_bytes: int = 2) -> float:
        """Bytes one decode step reads: the weights once for all rows, each row's KV cache."""
        weights = self.text_params() * dtype_bytes
        kv = rows * 2 * self.layers * self.kv_heads * self.head_dim * context * dtype_bytes
        return weights + kv


@dataclass
class LoopCost:
    """The loop for one query image: S examples x T boxes, R candidates, L refinement rounds."""

    S: int = 30
    T: int = 5
    R: int = 6
    L: int = 2
    text_per_box: int = 22  # "(4.5, 123, 456, 789, 1000), " in Mistral tokens (digits one by one)
    text_fixed: int = 160  # instruction + query line
    answer_tokens: int = 24  # one box and EOS
    separator_tokens: int = 2  # ", " between the boxes of one answer

    def list_answer_tokens(self) -> int:
        """One answer listing R boxes (the default list mode): R boxes, R-1 separators, one EOS."""
        return self.R * (self.answer_tokens - 1) + (self.R - 1) * self.separator_tokens + 1

    def prompt_tokens(self, shape: Shape) -> dict[str, int]:
        img = shape.image_tokens()
        round0 = self.text_fixed + self.S * (img + self.T * self.text_per_box + 2) + img + 10
        refine_extra = 20 + self.R * (img + self.text_per_box + 8) + 30
        return {"round0": round0, "refinement": round0 + refine_extra, "shared_with_round0": round0 - 10,
                "images_round0": self.S + 1, "images_refinement": self.S + 1 + self.R}

    def stages(self, shape: Shape, device: dict, *, prefix_cache: bool = True, vision_cache: bool = True,
               parallel: bool = False, batch: int = 1) -> dict[str, dict[str, float]]:
        """FLOPs, bytes and time at the device's limit for each stage of one query (amortised
        over a batch of `batch` queries for the decode weights)."""
        tok = self.prompt_tokens(shape)
        rounds = 1 + self.L
        # vision: examples recur across rounds (and across queries); crops are new every round
        n_images = (self.S + 1) * (1 if vision_cache else rounds) + self.R * self.L
        vision = n_images * shape.vision_flops()
        # prefill: refinement rounds read the shared prefix from the cache when prefix caching is on
        pre = shape.prefill_flops(tok["round0"])
        for _ in range(self.L):
            if prefix_cache:
                pre += shape.prefill_flops(tok["refinement"] - tok["shared_with_round0"], tok["shared_with_round0"])
            else:
                pre += shape.prefill_flops(tok["refinement"])
        # decode: each step reads the weights once per batch and every row's KV. List mode (the
        # default): one row per prompt whose answer lists the R boxes one after another; parallel
        # mode: n=R one-box samples share the prompt (one prefill), R rows of one box each
        ctx = tok["refinement"]
        steps = self.answer_tokens if parallel else self.list_answer_tokens()
        rows = self.R if parallel else 1
        dec_flops = rounds * steps * rows * shape.decode_flops(ctx)
        dec_bytes = rounds * steps * shape.decode_bytes(rows * batch, ctx) / batch
        out = {
            "vision": {"flops": vision, "bytes": 0.0},
            "prefill": {"flops": pre, "bytes": 0.0},
            "decode": {"flops": dec_flops, "bytes": dec_bytes},
        }
        for st in out.values():
            st["limit_s"] = max(st["flops"] / device["flops"], st["bytes"] / device["bandwidth"])
        return out


def device_limits() -> dict[str, Any]:
    """Peak FLOP/s and bandwidth of the device the benchmark runs on."""
    from bench.common import device_info, measured_cpu_limits

    info = device_info()
    gpu = str(info.get("gpu", "")).lower()
    for key, lim in DEVICES.items():
        if key in gpu:
            return dict(lim)
    if gpu:
        return {"name": info["gpu"], "flops": float("nan"), "bandwidth": float("nan")}
    return measured_cpu_limits()


def report(shape: Shape, device: dict, loop: LoopCost, batch: int = 1) -> dict:
    variants = {
        "engine, list mode (R boxes in one answer)": {},
        "no prefix cache": {"prefix_cache": False},
        "no vision-feature reuse": {"vision_cache": False},
        "parallel mode (n=R one-box samples)": {"parallel": True},
    }
    out = {"device": device["name"], "loop": asdict(loop), "batch": batch,
           "prompt_tokens": loop.prompt_tokens(shape), "text_params_b": shape.text_params() / 1e9,
           "vision_gflops_per_image": shape.vision_flops() / 1e9, "variants": {}}
    for name, kw in variants.items():
        st = loop.stages(shape, device, batch=batch, **kw)
        out["variants"][name] = {k: {"tflops": v["flops"] / 1e12, "gbytes": v["bytes"] / 1e9,
                                     "limit_ms": 1e3 * v["limit_s"]} for k, v in st.items()}
        out["variants"][name]["total_limit_ms"] = sum(1e3 * v["limit_s"] for v in st.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=sorted(DEVICES), default="h100")
    ap.add_argument("-S", type=int, default=30)
    ap.add_argument("-T", type=int, default=5)
    ap.add_argument("-R", type=int, default=6)
    ap.add_argument("-L", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the limits at batch 1 and 8 (the README's figures) to PATH "
                         "[default: bench/results/costmodel.json]")
    args = ap.parse_args()
    shape = Shape.from_dict(IDEFICS2_8B)
    if args.out:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.common import RESULTS, save_json

        loop = LoopCost(args.S, args.T, args.R, args.L)
        reps = {f"batch_{b}": report(shape, DEVICES[args.device], loop, b) for b in (1, 8)}
        path = RESULTS / "costmodel.json" if args.out == "-" else Path(args.out)
        save_json(path, {"what": "the cost model's limits (docs/COST_MODEL.md), not a measurement", **reps})
        print(f"wrote {path}")
    rep = report(shape, DEVICES[args.device], LoopCost(args.S, args.T, args.R, args.L), args.batch)
    if args.json:
        print(json.dumps(rep, indent=2))
        return
    print(f"Idefics2-8B on {rep['device']}, S={args.S} T={args.T} R={args.R} L={args.L}, batch {args.batch}")
    print(f"prompt tokens: {rep['prompt_tokens']}; text params {rep['text_params_b']:.2f} B; "
          f"vision {rep['vision_gflops_per_image']:.0f} GFLOPs per image")
    print(f"{'variant':<44} {'vision ms':>10} {'prefill ms':>11} {'decode ms':>10} {'total ms':>9}")
    for name, v in rep["variants"].items():
        print(f"{name:<44} {v['vision']['limit_ms']:>10.1f} {v['prefill']['limit_ms']:>11.1f} "
              f"{v['decode']['limit_ms']:>10.1f} {v['total_limit_ms']:>9.1f}")
    print(json.dumps({k: round(v["total_limit_ms"], 2) for k, v in rep["variants"].items()}))


if __name__ == "__main__":
    main()
