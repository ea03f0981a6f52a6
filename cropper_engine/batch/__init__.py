"""Offline batch cropping: stream inputs, crop in batches, write crops + results.jsonl, resume.

Inputs are image files, directories (walked lazily, one directory listing at a time, symbolic
links to folders followed, each folder once) and manifests (.txt: one path per line; .jsonl:
{"image", "ratio"?, "mask"?, "subject"?, "task"?}, where "subject" is a `--subject` spec: auto,
face, person, saliency, "X,Y", "X1,Y1,X2,Y2" or a mask path). Nothing holds more than one batch
of decoded images. Outputs never overwrite an input or an existing file and never collide, across
resumed runs too; `resume` skips what results.jsonl already holds.

What a folder walk does not read (hidden files, files of a type Pillow cannot decode here, a
second link to a folder already walked) is named with the reason in OUT/skipped.jsonl and the
summary. A crop and its results.jsonl row exist only once whole: the crop is encoded in memory,
written to a temporary name beside it, synced and renamed; the row is appended whole or cut back.
A full disk stops the run cleanly (the rest is done by `--resume`); a crop over the file-size
limit (`ulimit -f`) is an error for that image only.

File names are kept as the file system has them: a name that is not UTF-8 is held with Python's
surrogateescape (in paths and messages alike) and written everywhere as \\udcXX, one escape per
byte that is not UTF-8: by JSON's own escape in results.jsonl, errors.jsonl and skipped.jsonl
(read back as the same name by --resume and `fit --dataset results`), on the terminal (the CLI
prints with errors="backslashreplace") and in the report and prompt files (`shown`).

The modules: inputs.py (what a run reads: folders, manifests, what a walk passes over), outputs.py
(where it writes: the places checked before any work, `OutputWriter`, the prompt files), atomic.py
(a file or a row written whole), resume.py (taking up an earlier run), runner.py (`run_batch`),
names.py (the run's file names, names as the file system has them, an OSError in words). This
package re-exports every name batch.py had (patch a name where its code looks it up: `_write` in
atomic.py).
"""

from __future__ import annotations

from cropper_engine.batch.atomic import (  # noqa: F401  (re-exported: the names batch.py had)
    JsonLines,
    _tmp_counter,
    _write,
    _write_all,
    atomic_write,
)
from cropper_engine.batch.inputs import (  # noqa: F401  (re-exported: the names batch.py had)
    CODECS,
    InputItem,
    _dir_key,
    _is_dir,
    _link_loop,
    _manifest,
    _walk,
    count_inputs,
    iter_inputs,
    out_rel,
    unread_reason,
    walk_suffixes,
)
from cropper_engine.batch.names import (  # noqa: F401  (re-exported: the names batch.py had)
    ERRORS,
    NAME_MAX,
    OWN_FILES,
    PARTIAL,
    PROMPTS,
    RESULTS,
    SKIPPED,
    TMP_PREFIX,
    is_disk_full,
    name_problem,
    os_problem,
    resolved,
    shown,
)
from cropper_engine.batch.outputs import (  # noqa: F401  (re-exported: the names batch.py had)
    CROP_FORMATS,
    CROP_SUFFIX,
    OUT_FORMATS,
    WRITERS,
    OutputWriter,
    _inside,
    _probe,
    check_new_dir,
    check_out_dir,
    check_out_file,
    check_out_format,
    fit_name,
    ratio_tag,
    write_prompts,
)
from cropper_engine.batch.resume import (  # noqa: F401  (re-exported: the names batch.py had)
    _rows,
    load_done,
    load_outputs,
    pid_alive,
    repair_results,
    scan_crops,
)
from cropper_engine.batch.runner import (  # noqa: F401  (re-exported: the names batch.py had)
    RESUME_HINT,
    BatchSummary,
    _discard,
    _fix,
    _Stop,
    _write_failure,
    ignore_sigxfsz,
    run_batch,
    warm_face_detector,
)

