"""The `cropper-engine` command line: a thin adapter over the library.

It parses options, builds the config, calls the library and turns a CropperError into a
one-line message (no traceback). Heavy imports happen inside the commands.

One module per command group (eval.py, crop.py, fit.py, index.py, models.py, serve.py); the
options and plumbing they share in options.py, the input parsers and prechecks in inputs.py.
This module holds the `main` group and adds the commands to it; every name the old cli.py
had is importable from here.
"""

from __future__ import annotations

import sys

import click

from cropper_engine.cli.crop import crop_cmd
from cropper_engine.cli.eval import _wants_config, eval_cmd, format_summary  # noqa: F401  (re-exported)
from cropper_engine.cli.fit import fit_cmd, sigterm_as_interrupt  # noqa: F401  (re-exported)
from cropper_engine.cli.index import (  # noqa: F401  (re-exported)
    ALREADY_IN_INDEX,
    index_add,
    index_build,
    index_info,
    index_query,
    skipped_count,
    subjects_line,
    subjects_option,
)
from cropper_engine.cli.index import index as index_group
from cropper_engine.cli.inputs import (  # noqa: F401  (re-exported)
    parse_ratios,
    parse_size,
    parse_subject_option,
    precheck_mask,
    precheck_sizes,
    precheck_subject,
)
from cropper_engine.cli.models import fitted_models, models_list, models_make_tiny  # noqa: F401  (re-exported)
from cropper_engine.cli.models import models as models_group
from cropper_engine.cli.options import (  # noqa: F401  (re-exported)
    DATASET_KINDS,
    dataset_options,
    default_model_option,
    embedder_option,
    friendly_errors,
    get_embedder,
    load_cfg,
    max_pixels_option,
    read_examples,
    subject_options,
    summarise_skipped,
)
from cropper_engine.cli.serve import serve_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML config file (defaults < file < CROPPER_* environment < flags).")
@click.version_option(package_name="cropper-engine")
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Crop images with an open vision-language model through in-context learning.

    \b
    Start here:
      cropper-engine crop photo.jpg --out crops/        crop with the best pipeline available
      cropper-engine crop DIR --task ratio --ratio 1:1,16:9 --out crops/ --report
      cropper-engine index build --dataset fcdb --annotations train.jsonl --out idx/
      cropper-engine eval --dataset fcdb --annotations val.jsonl --method center --ratio-from-gt
      cropper-engine models list                        which VLMs are known and present here
      cropper-engine fit --dataset jsonl --annotations my_crops.jsonl --out my_model/
                                                        fit the no-VLM default to your own crops
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_file
    lenient_stdio()


def lenient_stdio() -> None:
    """A file name that is not UTF-8 (held as surrogate escapes) is printed as \\udcXX, the escape
    results.jsonl and errors.jsonl write for it, instead of ending the command with a
    UnicodeEncodeError (and its summary lost)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass


# the command modules define their commands; they join the group here, in the old order
# (`--help` lists them by name)
main.add_command(eval_cmd)
main.add_command(crop_cmd)
main.add_command(fit_cmd)
main.add_command(index_group)
main.add_command(models_group)
main.add_command(serve_cmd)


def run() -> None:
    main(prog_name="cropper-engine")


if __name__ == "__main__":
    run()
