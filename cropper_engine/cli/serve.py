"""`cropper-engine serve`: the engine over HTTP.
"""

from __future__ import annotations

import click

from cropper_engine.cli.options import default_model_option, friendly_errors, load_cfg, max_pixels_option


@click.command("serve")
@default_model_option
@click.option("--host", default=None, help="Address to bind [default: 127.0.0.1]; any other needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port [default: 8000].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML config file (its [server] table: limits, batching, api_key).")
@click.option("--index", "index_dir", type=click.Path(), default=None, help="Example index directory.")
@click.option("--vlm", default=None, help="auto [default] | none | a model name or local folder.")
@click.option("--backend", default=None, help="VLM backend: auto | transformers | vllm | openai.")
@click.option("--vlm-url", default=None,
              help="The OpenAI-compatible server of the openai backend, e.g. http://127.0.0.1:8001/v1.")
@click.option("--api-key", default=None,
              help="Require 'Authorization: Bearer KEY' (better: CROPPER_SERVER_API_KEY, not shown by ps).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None, help="Requests per engine batch [8].")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 1000), default=None,
              help="How long an idle engine waits to fill a batch [5].")
@click.option("--queue-size", type=click.IntRange(1, 100_000), default=None,
              help="Requests waiting at most; beyond, 503 with Retry-After [64].")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=None,
              help="Seconds a request may take before a 504 [120].")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.01), default=None, help="Upload limit [25].")
@max_pixels_option
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for the engine's torch ops [torch's default: one per core]; 1 is steadier "
                   "on a machine shared with other busy processes.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
@friendly_errors
def serve_cmd(ctx: click.Context, host: str | None, port: int | None, config_file: str | None,
              index_dir: str | None, vlm: str | None, backend: str | None, vlm_url: str | None,
              api_key: str | None, max_batch: int | None, batch_wait_ms: float | None, queue_size: int | None,
              timeout_s: float | None, max_upload_mb: float | None, max_pixels: int | None, threads: int | None,
              log_level: str) -> None:
    """Serve the engine over HTTP: POST /v1/crop, a page to try it at /, /docs, /metrics.

    \b
    Examples:
      cropper-engine serve                                   the default pipeline on 127.0.0.1:8000
      cropper-engine serve --vlm tiny/idefics2 --backend transformers
      cropper-engine serve --backend openai --vlm-url http://gpu-box:8001/v1
      CROPPER_SERVER_API_KEY=secret cropper-engine serve --host 0.0.0.0
      curl -F image=@photo.jpg -F ratio=16:9 http://127.0.0.1:8000/v1/crop
    """
    import logging
    import os

    import uvicorn

    from cropper_engine.server import create_app, header_timeout_protocol, return_freed_memory

    if threads:  # read by torch when the engine loads it
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if config_file:
        ctx.obj["config"] = config_file
    cfg = load_cfg(ctx, **{
        "index": index_dir, "vlm.model": vlm, "vlm.backend": backend, "vlm.base_url": vlm_url,
        "server.host": host, "server.port": port, "server.api_key": api_key, "server.max_batch": max_batch,
        "server.batch_wait_ms": batch_wait_ms, "server.queue_size": queue_size,
        "server.request_timeout_s": timeout_s, "server.max_upload_mb": max_upload_mb, "max_pixels": max_pixels})
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(cfg)
    return_freed_memory()
    s = cfg.server
    click.echo(f"serving on http://{s.host}:{s.port}/ (API key {'required' if s.api_key else 'not required'}; "
               f"batches of up to {s.max_batch}, queue {s.queue_size})", err=True)
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level=log_level, timeout_graceful_shutdown=10,
                    server_header=False, http=header_timeout_protocol(s.header_timeout_s, s.send_timeout_s))
    except SystemExit:
        if not getattr(app.state, "startup_error", None):
            raise
    err = getattr(app.state, "startup_error", None)
    if err:
        raise click.ClickException(f"the engine could not be loaded: {err}")

