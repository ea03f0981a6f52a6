"""The bad-input catalogue: every kind of bad input and fault a hostile new user tried (issue 12),
built here, and the exact outcome asserted for the CLI and the server alike: a named error (the
file, the problem, the fix), the good inputs still cropped, nothing lost, no traceback, the right
status code. The README's "Reliability" section lists it.

    CLI, one batch over a folder of good and bad files  test_cli_folder_catalogue
    server, the same files uploaded one by one          test_server_upload_catalogue
    options and fields refused on both, before work     test_refused_options_cli / _server
    a mask with a ratio: kept inside, same on both      test_mask_with_ratio_is_kept_inside_on_both
    manifests (ratio honoured, task ratio without one)  test_manifest_catalogue
    resume over a half-written last results line        test_resume_over_a_torn_last_line
    unwritable --out                                    test_unwritable_out_is_refused_before_work
    a damaged index                                     test_damaged_index_is_named_with_the_rebuild_command
    pixel limits (Pillow's guard is not the limit)      test_pixel_limit_*
    server phases: headers, body, disconnects, budget   test_server_* (real uvicorn on 127.0.0.1)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from needs import need_module
from PIL import Image

from bench.memory_bench import big_png
from cropper_engine.cli import main
from cropper_engine.config import load_config
from cropper_engine.errors import ConfigError, ImageError
from cropper_engine.imageio import format_pixels, open_image

need_module("fastapi", "the server extra (FastAPI)", module_level=True)
uvicorn = need_module("uvicorn", "the server extra (uvicorn)", module_level=True)
from fastapi.testclient import TestClient  # noqa: E402

from cropper_engine.server import PixelBudget, create_app, header_timeout_protocol  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def cfg(**over):
    return load_config(env={}, overrides={"vlm.model": "none", "retrieval.embedder": "classical", **over})


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in res.output, res.output
    return res


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(w=100_000, h=100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


# --- the catalogue of files --------------------------------------------------------------------

# name -> what the error must say (None: a good input, cropped; a str in `NOTES`: cropped, with a note)
BAD_FILES = {
    "truncated.jpg": "truncated",
    "header-only.jpg": "cannot read image",
    "text.jpg": "not an image Pillow can read",
    "empty.jpg": "empty file",
    "bomb.png": "more than the limit of 120 MP",
    "garbage.gif": "not an image Pillow can read",
    "damaged-pages.tif": "corrupt image (TypeError: Missing dimensions); the file is damaged",  # issue 23
}
LINKS = {  # file-system faults: the CLI only (an upload has no links)
    "loop.jpg": "a loop of symbolic links",
    "dangling.jpg": "a symbolic link to nowhere.jpg, which does not exist",
}
NOTES = {"animated.gif": "the first of its 3 frames", "transparent.png": "composited on white"}


def make_catalogue(folder: Path, photos: list[Path]) -> tuple[set[str], set[str]]:
    """Good photos, good-with-a-note images and every kind of bad file in one folder:
    (the good names, the bad names)."""
    folder.mkdir()
    good = set()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
        good.add(p.name)
    data = photos[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "header-only.jpg").write_bytes(data[:200])
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "garbage.gif").write_bytes(b"GIF89a" + b"\x01" * 50)
    for name, make in DAMAGED_FILES.items():  # issue 23's, made at the end of this file
        (folder / name).write_bytes(make())
    frames = [Image.new("RGB", (160, 120), c) for c in ("red", "green", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    rgba = np.zeros((120, 160, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 80:, 3] = 255  # the left half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    g16 = (np.arange(120 * 160, dtype=np.uint16).reshape(120, 160) * 3)
    Image.fromarray(g16).save(folder / "grey16.png")  # 16-bit grey
    good |= {"animated.gif", "transparent.png", "grey16.png"}
    return good, set(BAD_FILES)


def test_cli_folder_catalogue(photos, tmp_path):
    """One `crop DIR --out` over good and bad files: exit 1, each bad file named once with its
    problem, every good one cropped (with a note where decoding changed it), no traceback."""
    folder = tmp_path / "in"
    good, bad = make_catalogue(folder, photos)
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("nowhere.jpg", folder / "dangling.jpg")
    out = tmp_path / "out"
    res = cli("crop", folder, "--out", out)
    assert res.exit_code == 1
    errors = [json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()]
    expected = {**BAD_FILES, **LINKS}
    assert len(errors) == len(expected), errors
    for name, text in expected.items():
        hits = [e for e in errors if Path(e.split(":")[0]).name == name]
        assert len(hits) == 1 and text in hits[0], (name, hits)
        assert f"{name}: " in res.output  # on the terminal too
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == sorted(good)
    for r in rows:
        assert Path(r["output"]).is_file()
        name = Path(r["image"]).name
        if name in NOTES:
            assert any(NOTES[name] in n for n in r.get("notes", [])), r.get("notes")
    assert f"{len(good) + len(bad) + len(LINKS)} images, {len(good)} crops" in res.output
    assert f"{len(expected)} errors" in res.output


@pytest.fixture(scope="module")
def engine():
    from cropper_engine.engine.loop import Cropper

    c = Cropper.from_config(cfg())
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(cfg(), cropper=engine)) as c:
        yield c


def error_of(r, status, type_=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    if type_:
        assert err["type"] == type_, err
    return err["message"]


def test_server_upload_catalogue(client, photos, tmp_path):
    """The same files uploaded: 422 naming the upload and the problem (400 for an empty file),
    200 for the good ones with the same notes, the engine alive throughout."""
    good, bad = make_catalogue(tmp_path / "in", photos)
    for name in sorted(bad):
        data = (tmp_path / "in" / name).read_bytes()
        r = client.post("/v1/crop", files={"image": (name, data)})
        if name == "empty.jpg":
            assert "empty file" in error_of(r, 400, "bad_request")
            continue
        msg = error_of(r, 422, "invalid_image")
        assert msg.startswith(f"{name}: ") and BAD_FILES[name] in msg, msg
        assert "<bytes>" not in msg and "BytesIO" not in msg
    for name in sorted(good):
        r = client.post("/v1/crop", files={"image": (name, (tmp_path / "in" / name).read_bytes())})
        assert r.status_code == 200, (name, r.text)
        if name in NOTES:
            assert any(NOTES[name] in n for n in r.json().get("notes", [])), r.json()
    bad_mask = client.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes()),
                                              "mask": ("subject.png", b"not a png")})
    msg = error_of(bad_mask, 422, "invalid_image")
    assert "the mask subject.png" in msg and "BytesIO" not in msg
    assert client.app.state.cropper_state.engine.alive


# --- options refused before any work, the same on both -------------------------------------------

REFUSED = [  # (CLI args after the image, server form fields, what both messages say)
    (["--ratio", ""], {"ratio": ""}, "names no ratio"),
    (["--ratio", " , "], {"ratio": " , "}, "names no ratio"),
    (["--ratio", "0:1"], {"ratio": "0:1"}, "ratio"),
    (["--ratio", "abc"], {"ratio": "abc"}, "ratio"),
    (["--task", "ratio"], {"task": "ratio"}, "needs"),
    (["--task", "free", "--ratio", "1:1"], {"task": "free", "ratio": "1:1"}, "only applies to"),
    (["--task", "subject"], {"task": "subject"}, "needs"),
    (["--task", "free", "--mask", "{mask}"], {"task": "free", "mask": "{mask}"}, "not to"),
    (["--mask", "{small}"], {"mask": "{small}"}, "must have"),
    (["--subject", "99999,5"], {"subject": "99999,5"}, "outside"),
]


@pytest.fixture
def masks(photos, tmp_path):
    w, h = Image.open(photos[0]).size
    right = np.zeros((h, w), np.uint8)
    right[h // 3: h // 2, w - 12:] = 255  # the subject at the right edge
    Image.fromarray(right).save(tmp_path / "mask.png")
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    return {"mask": tmp_path / "mask.png", "small": tmp_path / "small.png"}


@pytest.mark.parametrize("args,_fields,text", REFUSED)
def test_refused_options_cli(photos, masks, tmp_path, args, _fields, text):
    args = [a.format(**masks) for a in args]
    res = cli("crop", photos[0], *args, "--out", tmp_path / "o")
    assert res.exit_code != 0 and text in res.output, res.output
    assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.parametrize("_args,fields,text", REFUSED)
def test_refused_options_server(client, photos, masks, _args, fields, text):
    files = {"image": ("a.jpg", photos[0].read_bytes())}
    data = {}
    for k, v in fields.items():
        if v.startswith("{"):
            files[k] = ("m.png", Path(v.format(**masks)).read_bytes())
        else:
            data[k] = v
    assert text in error_of(client.post("/v1/crop", files=files, data=data), 422)


def test_pixel_limit_small_and_flag(photos, tmp_path):
    """Over --max-pixels: named with its size, the limit in readable units and the flag, which exists."""
    res = cli("crop", photos[0], "--max-pixels", "1000")
    w, h = Image.open(photos[0]).size
    assert res.exit_code == 1
    assert f"{w}x{h} = {format_pixels(w * h)}, more than the limit of 1,000 pixels" in res.output
    assert "--max-pixels N (crop, serve)" in res.output and "0 MP" not in res.output
    assert cli("crop", photos[0], "--max-pixels", str(w * h)).exit_code == 0


def test_pixel_limit_is_ours_not_pillows():
    """A 92 MP PNG (over Pillow's 89.5 MP guard) is judged by our limit, with its size named."""
    data = big_png(11_000, 8_378)
    with pytest.raises(ImageError) as exc:
        open_image(data, 50_000_000, name="big.png")
    assert "big.png: 11000x8378 = 92.16 MP, more than the limit of 50 MP" in str(exc.value)
    with pytest.raises(ImageError) as exc:
        open_image(bomb_png(), 500_000_000, name="bomb.png")  # 10 000 MP: over ours, whatever Pillow's
    # its width and height read from the header, though Pillow refuses it inside Image.open
    assert "bomb.png: 100000x100000 = 10,000 MP, more than the limit of 500 MP" in str(exc.value)


@pytest.mark.slow
def test_pixel_limit_above_pillows_guard_decodes():
    """The configured limit is the real one: 92 MP decodes under a 500 MP limit (Pillow alone
    refuses it as a bomb); /v1/info reports that same limit."""
    loaded = open_image(big_png(11_000, 8_378), 500_000_000, name="big.png")
    assert loaded.size == (11_000, 8_378)


# --- the mask with a ratio, manifests, resume, --out, the index ----------------------------------


def test_mask_with_ratio_is_kept_inside_on_both(client, photos, masks):
    w, h = Image.open(photos[0]).size
    res = cli("crop", photos[0], "--ratio", "1:1", "--mask", masks["mask"], "--json")
    assert res.exit_code == 0, res.output
    row = next(json.loads(line) for line in res.output.splitlines() if line.startswith("{"))
    _x1, y1, x2, y2 = row["box"]
    assert row["ratio"] == "1:1" and x2 >= w - 1 and y1 <= h // 3 and y2 >= h // 2, row  # the subject inside
    r = client.post("/v1/crop", files={"image": (photos[0].name, photos[0].read_bytes()),
                                       "mask": ("mask.png", masks["mask"].read_bytes())}, data={"ratio": "1:1"})
    assert r.status_code == 200 and r.json()["box"] == row["box"], r.text


def test_manifest_catalogue(photos, tmp_path, masks):
    """Each line's own ratio is honoured; task ratio without one, a ratio with task free, bad
    JSON and a missing image are each a named error; the other lines are cropped."""
    src = tmp_path / "in"
    src.mkdir()
    for p in photos:
        (src / p.name).write_bytes(p.read_bytes())
    a, b, c, d = (p.name for p in photos[:4])
    lines = [
        {"image": a, "ratio": "16:9"},
        {"image": b, "task": "ratio"},
        {"image": c, "task": "free", "ratio": "1:1"},
        {"image": d},
        {"image": a, "ratio": "1:1", "mask": str(masks["mask"])},
        {"image": "missing.jpg"},
    ]
    (src / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "out"
    res = cli("crop", src / "m.jsonl", "--out", out)
    assert res.exit_code == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    got = sorted((Path(r["image"]).name, r["ratio"], r["task"]) for r in rows)
    assert got == sorted([(a, "16:9", "ratio"), (d, None, "free"), (a, "1:1", "ratio")])
    assert next(r for r in rows if r["ratio"] == "1:1")["box"][2] >= Image.open(photos[0]).width - 1
    errors = "\n".join(json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines())
    assert f'{b}: "task": "ratio" needs a ratio' in errors
    assert f'{c}: "ratio" only applies to the ratio task' in errors
    assert "m.jsonl:7: bad manifest line" in errors and "missing.jpg: no such file" in errors
    assert "0 skipped" in res.output and "4 errors" in res.output


def test_resume_over_a_torn_last_line(photos, tmp_path):
    out = tmp_path / "out"
    assert cli("crop", *photos, "--out", out).exit_code == 0
    path = out / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    torn = lines[-1][:40]
    path.write_bytes(b"".join(lines[:-1]) + torn)  # killed mid-write
    res = cli("crop", *photos, "--out", out, "--resume")
    assert res.exit_code == 0 and "cut short" in res.output
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert sorted(Path(r["image"]).name for r in rows) == sorted(p.name for p in photos)  # nothing lost
    assert (out / "results.partial.jsonl").read_bytes() == torn + b"\n"
    # a whole last row missing only its newline is kept, not cropped again
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    res = cli("crop", *photos, "--out", out, "--resume")
    assert res.exit_code == 0 and f"{len(photos)} skipped" in res.output
    assert len(path.read_text().splitlines()) == len(photos)


@pytest.mark.parametrize("where", ["/proc/cropper-x", "file", "readonly"])
def test_unwritable_out_is_refused_before_work(photos, tmp_path, where):
    if where == "file":
        target = tmp_path / "f"
        target.write_text("x")
    elif where == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out"
    else:
        target = Path(where)
    res = cli("crop", photos[0], "--out", target)
    assert res.exit_code != 0
    if where == "file":  # click's own check of the option: a usage error naming it
        assert "'--out'" in res.output and f"{target}' is a file" in res.output
    else:
        assert f"cannot write to --out {target}" in res.output
    assert "pipeline:" not in res.output  # refused before the engine was even built


def test_damaged_index_is_named_with_the_rebuild_command(photos, tmp_path):
    from cropper_engine.data.example import Example
    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.models.embedders import resolve_embedder
    from cropper_engine.types import Box

    emb, _ = resolve_embedder("classical")
    exs = [Example(id=p.stem, image_path=str(p), width=Image.open(p).width, height=Image.open(p).height,
                   crops=[Box(0, 0, 50, 50)]) for p in photos]
    idx_dir = tmp_path / "idx"
    ExampleIndex.build(exs, emb, idx_dir, source={"dataset": "jsonl", "annotations": "/data/a.jsonl"})
    assert cli("index", "info", idx_dir).exit_code == 0
    graph = idx_dir / "graph.bin"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"image": str(photos[0]), "crop": [0, 0, 50, 50]}) + "\n")
    for args in (["index", "info", idx_dir], ["index", "query", idx_dir, photos[0]],
                 ["index", "add", idx_dir, "--dataset", "jsonl", "--annotations", ann],
                 ["crop", photos[0], "--index", idx_dir]):
        res = cli(*args)
        assert res.exit_code == 1, (args, res.output)
        assert "graph.bin is damaged" in res.output, (args, res.output)
        assert "index build --dataset jsonl --annotations /data/a.jsonl" in res.output and "--overwrite" in res.output


# --- the server's phases (a real uvicorn on 127.0.0.1) ----------------------------------------------


class LiveServer:
    def __init__(self, app, header_timeout_s: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="info",
                                http=header_timeout_protocol(header_timeout_s))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        return s


def read_all(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket's time-out bounds it)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; got {out[:200]!r}") from None
        if not chunk:
            return out
        out += chunk


def test_server_timeouts_default_to_30_s():
    s = load_config(env={}).server
    assert s.header_timeout_s == 30 and s.body_timeout_s == 30
    assert header_timeout_protocol(s.header_timeout_s).header_timeout_s == 30


def test_server_slow_headers_and_half_bodies_are_cut_off(engine, photos, caplog):
    """Headers that never end: the connection is closed; half a body: 408, then closed. Short
    limits here (the defaults are 30 s); nothing waits on the clock but the server's own timers."""
    app = create_app(cfg(**{"server.body_timeout_s": 0.5}), cropper=engine)
    with LiveServer(app, header_timeout_s=0.5) as srv, caplog.at_level(logging.INFO):
        s = srv.connect()
        s.sendall(b"POST /v1/crop HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert read_all(s) == b""
        s.close()
        body = photos[0].read_bytes()
        s = srv.connect()
        s.sendall(b"POST /v1/crop HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        answer = read_all(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within 0.5 s" in answer
        s = srv.connect()  # the server serves on
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 200")
        s.close()
    assert "request headers did not arrive within 0.5 s" in caplog.text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_server_client_gone_mid_upload_is_one_quiet_line(engine, photos, caplog):
    app = create_app(cfg(), cropper=engine)
    body = photos[0].read_bytes()
    with LiveServer(app, header_timeout_s=30) as srv, caplog.at_level(logging.INFO):
        for _ in range(3):
            s = srv.connect()
            s.sendall(b"POST /v1/crop HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
                      + f"Content-Length: {len(body) + 200}\r\n\r\n".encode()
                      + b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
                      + body[:1000])
            s.close()
        deadline = time.monotonic() + 20
        metrics = ""
        while time.monotonic() < deadline and 'status="499"} 3.0' not in metrics:
            c = srv.connect()
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            metrics = read_all(c).decode()
            c.close()
            time.sleep(0.05)
    assert 'cropper_requests_total{endpoint="crop",status="499"} 3.0' in metrics
    assert 'status="500"' not in metrics
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 3 and all(r.levelno == logging.INFO for r in gone)
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_pixel_budget_orders_and_bounds():
    """At most `total` pixels held at once, in arrival order; one larger than the budget runs
    alone; a wait past its time-out is a TimeoutError and holds nothing."""
    async def scenario() -> None:
        b = PixelBudget(100)
        await b.acquire(60, 1)
        assert b.used == 60
        second = asyncio.ensure_future(b.acquire(50, 30))
        await asyncio.sleep(0)
        assert not second.done() and b.used == 60
        with pytest.raises(TimeoutError):
            await b.acquire(10, 0.05)  # behind the waiting one, in order
        b.release(60)
        await second
        assert b.used == 50
        big = asyncio.ensure_future(b.acquire(500, 30))
        await asyncio.sleep(0)
        assert not big.done()
        b.release(50)
        await big
        assert b.used == 500
        b.release(500)
        assert b.used == 0

    asyncio.run(scenario())


def test_server_config_refusals(photos):
    for key in (" ", "  secret ", "\t"):
        with pytest.raises(ConfigError, match="API key"):
            create_app(cfg(**{"server.api_key": key}))
    res = cli("serve", "--api-key", " ")
    assert res.exit_code == 1 and "the API key is blank" in res.output
    with pytest.raises(ConfigError, match="header_timeout_s"):
        create_app(cfg(**{"server.header_timeout_s": 0}))


def test_server_auth_and_limits(engine, photos):
    """The ones handled before this catalogue: 401 without the key, 413 over the upload limit, 415
    for another content type, a URL refused (never fetched), 422 over the pixel limit."""
    data = photos[0].read_bytes()
    app = create_app(cfg(**{"server.api_key": "k" * 16, "server.max_upload_mb": 0.01}), cropper=engine)
    with TestClient(app) as c:
        assert error_of(c.post("/v1/crop", files={"image": ("a.jpg", data)}), 401, "unauthorized")
        auth = {"Authorization": "Bearer " + "k" * 16}
        assert error_of(c.post("/v1/crop", files={"image": ("a.jpg", data)}, headers=auth), 413, "too_large")
        assert error_of(c.post("/v1/crop", content=b"x", headers={**auth, "content-type": "text/plain"}), 415)
        r = c.post("/v1/crop", json={"image": "https://example.com/a.jpg"}, headers=auth)
        assert error_of(r, 400, "url_refused")
    with TestClient(create_app(cfg(max_pixels=1000), cropper=engine)) as c:
        msg = error_of(c.post("/v1/crop", files={"image": ("a.jpg", data)}), 422, "invalid_image")
        assert msg.startswith("a.jpg: ") and "more than the limit of 1,000 pixels" in msg
        assert c.get("/v1/info").json()["limits"]["max_pixels"] == 1000


# --- issue 23: images, masks and the library ------------------------------------------------------
#
#   a damaged multi-page TIFF (BAD_FILES above)        test_cli_folder_catalogue, test_server_upload_catalogue
#   one stream of good and bad library inputs          test_crop_many_catalogue
#   a 0-size array, a broken face-detector graph       test_a_bad_input_never_breaks_the_cropper
#   ratios that name no ratio or an extreme one        test_ratio_catalogue
#   a decompression-bomb mask: library, CLI            test_mask_bomb_catalogue
#   16-bit / alpha images under the pixel limit        test_pixel_limit_counts_bytes_per_pixel
#   a fitted model with a truncated ratio.npz          test_truncated_fitted_model
#   tiny images: the exact ratio, or a note            test_tiny_images_keep_the_ratio_or_say_so


def _damaged_tiff() -> bytes:
    from tests.test_imageio import damaged_tiff

    return damaged_tiff()


DAMAGED_FILES = {"damaged-pages.tif": _damaged_tiff}


@pytest.fixture(scope="module")
def library():
    from cropper_engine import Cropper

    c = Cropper(overrides={"vlm.model": "none", "retrieval.embedder": "classical"})
    yield c
    c.close()


def test_crop_many_catalogue(library, photos, tmp_path):
    """One crop_many stream, batches of 3, good and bad items mixed: each bad item is its own named
    CropperError in its slot, every good one (in the same batches) is cropped, in order."""
    from bench.memory_bench import big_png
    from cropper_engine.errors import CropperError, InputError

    data = photos[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "bomb-mask.png").write_bytes(big_png(20_000, 10_000))  # 200 MP, a few KB
    w, h = Image.open(photos[0]).size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3: h // 2, w // 3: w // 2] = 255
    mask_png = png(Image.fromarray(mask))
    good = str(photos[0])
    items = [
        (good, None),
        (None, (InputError, "image is None")),
        (5, (InputError, "image 5 (int) is not an image")),
        ("a\0b.jpg", (InputError, "contains a NUL character")),
        (str(tmp_path / ("x" * 300 + ".jpg")), (ImageError, "cannot use this path (File name too long)")),
        (Image.open(tmp_path / "cut.jpg"), (ImageError, "cut.jpg: truncated file")),
        (np.zeros((0, 10, 3), np.uint8), (ImageError, "has no pixels (shape (0, 10, 3))")),
        ({"image": good, "mask": str(tmp_path / "bomb-mask.png")},
         (ImageError, "20000x10000 = 200 MP, more than the limit of 120 MP")),
        ({"image": good, "mask": mask_png}, None),  # a mask given as the bytes of a PNG: it works
        ({"image": good, "ratio": []}, (InputError, "names no ratio")),
        (str(photos[1]), None),
    ]
    outs = list(library.crop_many([i for i, _ in items], ratio=None, batch_size=3))
    assert len(outs) == len(items)
    for (item, want), out in zip(items, outs, strict=True):
        if want is None:
            assert not isinstance(out, CropperError), (item if not isinstance(item, dict) else item["mask"][:20], out)
            continue
        kind, text = want
        assert isinstance(out, kind) and text in str(out), (type(out).__name__, str(out))
        assert "Traceback" not in str(out) and "DecompressionBomb" not in str(out)
    kept = outs[8]
    assert kept.box.x1 <= w // 3 and kept.box.y1 <= h // 3 and kept.box.x2 >= w // 2 and kept.box.y2 >= h // 2


def test_crop_many_an_engine_fault_stays_with_its_item(library, photos, monkeypatch):
    """An unexpected exception for one image inside a batch: that item gets a CropperError naming
    it, the others of its batch are cropped, the stream goes on."""
    from cropper_engine.errors import CropperError

    engine = library.engine
    real = engine.crop_batch

    def flaky(requests, *a, **kw):
        if any(r.id == photos[1].name for r in requests):
            raise RuntimeError("Graph has errors")
        return real(requests, *a, **kw)

    monkeypatch.setattr(engine, "crop_batch", flaky)
    outs = list(library.crop_many([str(p) for p in photos[:3]], batch_size=3))
    assert isinstance(outs[1], CropperError), outs[1]
    assert f"{photos[1].name}: the engine failed on it (RuntimeError" in str(outs[1])
    assert not isinstance(outs[0], CropperError) and not isinstance(outs[2], CropperError)


def test_a_bad_input_never_breaks_the_cropper(library, photos):
    """A 0-size array is refused before anything runs; and a face-detector graph left in error
    (as a 0-size image once left it) is rebuilt: the next photo is cropped, faces kept."""
    pytest.importorskip("mediapipe", reason="the subject extra (mediapipe) is not installed")
    from cropper_engine.engine.subject.detectors import face_detector

    with pytest.raises(ImageError, match=r"no pixels \(shape \(0, 10, 3\)\)"):
        library.crop(np.zeros((0, 10, 3), np.uint8))
    det = face_detector()
    before = getattr(det, "rebuilds", 0)
    with pytest.raises(RuntimeError):  # what MediaPipe's graph does with a 0-size image
        det._full.process(np.zeros((0, 10, 3), np.uint8))
    for p in photos[:2]:
        crop = library.crop(str(p), ratio="16:9")
        assert crop.box.width > 0
    assert det.rebuilds == before + 1


def test_ratio_catalogue(library, photos):
    """The one ratio parser: numbers range-checked, nested comma lists flattened, empty or 0
    refused (as a server's \"ratio\": [] and a manifest's \"ratio\": \"\" or 0 will be)."""
    from cropper_engine.errors import InputError
    from cropper_engine.types import parse_ratios

    img = str(photos[0])
    for bad, text in ((1000.0, "more extreme than 20:1"), (0.01, "more extreme than 20:1"), ([], "names no ratio"),
                      ("", "names no ratio"), (" , ", "names no ratio"), (0, "must be positive"),
                      ([[]], "names no ratio"), (True, "bad ratio True"), ({"w": 1}, "bad ratio")):
        with pytest.raises(InputError, match=text):
            library.crop(img, ratio=bad)
        with pytest.raises(InputError, match=text):
            parse_ratios(bad)
    crops = library.crop(img, ratio=["1:1,16:9", "4:5"])
    assert [str(c.ratio) for c in crops] == ["1:1", "16:9", "4:5"]
    assert str(library.crop(img, ratio=1.5).ratio) == "1.5:1"
    assert parse_ratios(None) == []
    assert [str(r) for r in parse_ratios(["16:9", ["1:1", "4:3,3:2"]])] == ["16:9", "1:1", "4:3", "3:2"]


def test_mask_bomb_catalogue(library, photos, tmp_path):
    """A decompression-bomb mask: the images' message (its size, the limit, the flag) from the
    library and the CLI; no Pillow wording, no traceback, no raw warning."""
    import warnings

    from bench.memory_bench import big_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(big_png(13_000, 10_000))  # 130 MP: over the limit, over Pillow's warning, under its error
    img = str(photos[0])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(ImageError) as exc:
        library.crop(img, mask=str(bomb))
    msg = str(exc.value)
    assert "13000x10000 = 130 MP, more than the limit of 120 MP" in msg and "--max-pixels" in msg, msg
    assert "Decompression" not in msg, msg
    assert not [w for w in seen if "pixels" in str(w.message)], [str(w.message) for w in seen]
    res = cli("crop", img, "--mask", bomb, "--max-pixels", "50000000")
    assert res.exit_code == 1 and "13000x10000 = 130 MP, more than the limit of" in res.output, res.output
    assert "DecompressionBomb" not in res.output and "Warning" not in res.output


def test_pixel_limit_counts_bytes_per_pixel(tmp_path):
    """A 16-bit grey PNG counts as an 8-bit one (decoded straight to 8 bits); an RGBA one counts
    1.6 times its pixels (8 bytes a pixel to decode, an 8-bit image 5), named with both figures."""
    g16 = tmp_path / "g16.png"
    g16.write_bytes(big_png(1_000, 1_000, bit_depth=16))
    assert open_image(g16, 1_000_000).size == (1_000, 1_000)
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (1_000, 1_000)).save(rgba)
    with pytest.raises(ImageError, match=r"1000x1000 = 1 MP of RGB with alpha, .* counts as 1.6 MP, more than the "
                                         r"limit of 1.5 MP"):
        open_image(rgba, 1_500_000)


def test_truncated_fitted_model(photos, tmp_path):
    """A fitted model whose ratio.npz was cut short: the folder, the file and the fix, not BadZipFile."""
    import shutil

    from cropper_engine.errors import ModelNotFoundError
    from cropper_engine.models.default_model import MODEL_DIR
    from cropper_engine.models.fitted import load_fitted

    d = tmp_path / "model"
    shutil.copytree(MODEL_DIR, d)
    data = (d / "ratio.npz").read_bytes()
    (d / "ratio.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelNotFoundError) as exc:
        load_fitted(d)
    msg = str(exc.value)
    assert str(d) in msg and "ratio.npz" in msg and "damaged or truncated" in msg and "cropper-engine fit" in msg, msg
    res = cli("crop", photos[0], "--default-model", d)
    assert res.exit_code != 0 and "BadZipFile: File" in res.output and "fit it again" in res.output, res.output


def test_tiny_images_keep_the_ratio_or_say_so(library):
    """The best whole-pixel box of the exact ratio that fits (50x20000 at 20:1: 40x2, not 49x2);
    where none fits (1x1 at 16:9, 5000x2 at 16:9), the crop says so in a note."""
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 255, (20_000, 50, 3), dtype=np.uint8)
    c = library.crop(tall, ratio="20:1")
    assert (c.box.width, c.box.height) == (40, 2) and not c.notes, (c.box, c.notes)
    for shape, ratio in (((1, 1), "16:9"), ((2, 5_000), "16:9")):
        c = library.crop(rng.integers(0, 255, (*shape, 3), dtype=np.uint8), ratio=ratio)
        want = f"no whole-pixel box of {ratio} fits this {shape[1]}x{shape[0]} image"
        assert any(want in n for n in c.notes), c.notes
    c = library.crop(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), ratio="16:9")
    assert abs(c.box.width / c.box.height / (16 / 9) - 1) < 0.01 and not any("whole-pixel" in n for n in c.notes)

# --- issue 23: the server --------------------------------------------------------------------------
#
#   wording: the API key; the upload limit in the unit it was set in     test_server_wording_*
#   a client that never reads its answer: dropped at server.send_timeout_s  test_server_send_timeout_*
#   malformed multipart: 400, and /metrics says 400                       test_server_malformed_multipart_*
#   any unexpected error: one traceback, a 500 that names nothing inside    test_server_unexpected_error_*,
#                                                                           test_server_engine_bug_*
#   a damaged multi-page TIFF: a named 4xx                                  test_server_damaged_multipage_tiff
#   a client gone while waiting for the pixel budget: never decoded        test_server_client_gone_while_*
#   a grant that comes as the wait is cancelled: given back                test_pixel_budget_grant_*
#   a body trickled in: 408 at body_timeout_s from the start of the body   test_server_trickled_body_*


def test_server_wording_api_key():
    with pytest.raises(ConfigError) as exc:
        create_app(cfg(**{"server.api_key": "  secret "}))
    assert str(exc.value).startswith("the API key has spaces around it: ") and "is has" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        create_app(cfg(**{"server.api_key": "  "}))
    assert str(exc.value).startswith("the API key is blank: ")


def test_server_wording_upload_limit_in_the_unit_it_was_set_in(engine):
    """max_upload_mb=25: every refusal says 25 MB (never 26.2, its bytes / 10^6), and sizes are
    in the same MB (2^20 bytes)."""
    app = create_app(cfg(**{"server.max_upload_mb": 25}), cropper=engine)
    over = b"\0" * (25 * 2**20 + 300 * 1024)  # 25.3 MB
    messages = []
    with TestClient(app) as c:
        assert c.get("/v1/info").json()["limits"]["max_upload_mb"] == 25
        messages.append(error_of(c.post("/v1/crop", files={"image": ("big.jpg", over)}), 413, "too_large"))
        b64 = base64.b64encode(over).decode()  # 33.7 MB of body: under the body limit, over the upload's
        messages.append(error_of(c.post("/v1/crop", json={"image": b64}), 413, "too_large"))
        huge = b"x" * (36 * 2**20)
        messages.append(error_of(c.post("/v1/crop", content=huge, headers={"content-type": "application/json"}),
                                 413, "too_large"))
    assert messages[0] == "'image' is over the limit of 25 MB (server.max_upload_mb)", messages
    assert messages[1] == "the image is 25.3 MB, over the limit of 25 MB (server.max_upload_mb)", messages
    assert messages[2] == ("the request body is 36.0 MB, more than an upload limit of 25 MB "
                           "(server.max_upload_mb) allows"), messages
    assert not any("26.2" in m for m in messages)



@contextlib.contextmanager
def uvicorn_logged(caplog):
    """uvicorn's own log lines (its "Exception in ASGI application" with a traceback) in caplog
    too: its logging config stops them at the "uvicorn" logger. After LiveServer(...), which
    applies that config."""
    logger = logging.getLogger("uvicorn")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def wait_for(what, seconds: float = 20.0, step: float = 0.02):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step)
    return what()


def noise_png(w: int = 2400, h: int = 1800) -> bytes:
    """Noise does not compress: 12 MB here, and the free crop of it (the whole image) 10 MB."""
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def multipart_request(name: str, data: bytes, query: str = "", close: bool = False) -> bytes:
    body = (b'--XX\r\nContent-Disposition: form-data; name="image"; filename="' + name.encode() + b'"\r\n\r\n'
            + data + b"\r\n--XX--\r\n")
    return (f"POST /v1/crop{query} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
            ).encode() + body


def connections(srv: LiveServer) -> list:
    for _ in range(50):
        try:
            return list(srv.server.server_state.connections)
        except RuntimeError:  # changed size while copied (the server's thread)
            time.sleep(0.01)
    return list(srv.server.server_state.connections)


def test_server_send_timeout_drops_a_client_that_never_reads(engine, caplog):
    """A client that asks for a 10 MB answer (?return=image) and never reads it: the answer
    backs up in the server; at server.send_timeout_s the connection is aborted and that buffer
    freed (uvicorn alone held both for as long as the client kept the socket). A client that
    reads gets its whole answer; the server serves on."""
    data = noise_png()
    app = create_app(cfg(**{"server.send_timeout_s": 0.5, "server.max_upload_mb": 64}), cropper=engine)
    with LiveServer(app, header_timeout_s=30) as srv, caplog.at_level(logging.INFO), uvicorn_logged(caplog):
        reader = srv.connect()  # one that reads: the whole answer
        reader.sendall(multipart_request("noise.png", data, "?return=image", close=True))
        answer = read_all(reader)
        reader.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"image/png" in head, head
        headers = dict(h.decode().lower().split(": ", 1) for h in head.split(b"\r\n")[1:])
        length = int(headers["content-length"])
        assert length > 8 * 2**20 and len(body) == length
        x1, y1, x2, y2 = (int(v) for v in headers["x-crop-box"].split(","))
        assert Image.open(io.BytesIO(body)).size == (x2 - x1, y2 - y1)

        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer backs up
        s.settimeout(20)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(multipart_request("noise.png", data, "?return=image"))
        t0 = time.monotonic()
        held = wait_for(lambda: sum(p.transport.get_write_buffer_size() for p in connections(srv)))
        assert held > 2**20, held  # the answer is held in the server, waiting for the client
        t_held = time.monotonic()
        assert wait_for(lambda: not connections(srv), 10), "the connection was kept"
        dropped_after = time.monotonic() - t_held
        assert dropped_after < 3.0, dropped_after  # 0.5 s after it backed up, give or take the machine
        got = b""
        with pytest.raises(ConnectionResetError):  # aborted: what the kernel held, then a reset
            while chunk := s.recv(65536):
                got += chunk
        s.close()
        assert len(got) < length, (len(got), length, time.monotonic() - t0)
        c = srv.connect()
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(c).startswith(b"HTTP/1.1 200")
        c.close()
    lines = [r.getMessage() for r in caplog.records if "did not take its answer" in r.getMessage()]
    assert len(lines) == 1 and "within 0.5 s (server.send_timeout_s" in lines[0], lines
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_server_send_timeout_is_configured_with_the_others():
    s = load_config(env={}).server
    assert s.send_timeout_s == 30
    assert load_config(env={"CROPPER_SERVER_SEND_TIMEOUT_S": "7"}).server.send_timeout_s == 7
    assert header_timeout_protocol(30, 4).send_timeout_s_given == 4
    with pytest.raises(ConfigError, match="send_timeout_s"):
        create_app(cfg(**{"server.send_timeout_s": 0}))
    with TestClient(create_app(cfg(**{"server.send_timeout_s": 9}))) as c:
        assert c.get("/v1/info").json()["limits"]["send_timeout_s"] == 9


def metrics_text(srv: LiveServer) -> str:
    c = srv.connect()
    c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = read_all(c).decode()
    c.close()
    return text


def test_server_malformed_multipart_is_400_in_metrics_too(client):
    """Starlette turns a bad multipart body into its own 400 inside an app: answered as ours,
    and /metrics counts the 400s the clients got (it counted them as 500)."""
    before = client.get("/metrics").text
    bad = [dict(content=b"abc", headers={"content-type": "multipart/form-data"}),
           dict(files={"image": ("a", b"1"), "mask": ("b", b"2"), "x": ("c", b"3")}),
           dict(content=b'--x\r\nContent-Disposition: form-data; name="task"\r\n\r\n' + b"a" * 70_000
                + b"\r\n--x--\r\n", headers={"content-type": "multipart/form-data; boundary=x"})]
    for kw in bad:
        assert "malformed multipart body" in error_of(client.post("/v1/crop", **kw), 400, "bad_request")

    def count(text: str, status: str) -> float:
        key = f'cropper_requests_total{{endpoint="crop",status="{status}"}} '
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)

    after = client.get("/metrics").text
    assert count(after, "400") - count(before, "400") == 3
    assert count(after, "500") == count(before, "500")


class GatedCropper:
    """The engine, held at its door until `gate` is set."""

    def __init__(self, inner) -> None:
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()

    def crop_batch(self, requests, *args, **kw):
        self.entered.set()
        self.gate.wait(60)
        return self.inner.crop_batch(requests, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_server_unexpected_error_is_one_traceback_and_a_plain_500(engine, photos, caplog, monkeypatch):
    """Any unexpected exception while handling an upload (here decoding raises what a damaged
    TIFF made Pillow raise) is one logged traceback and a 500 whose message names nothing inside
    the server; an ImageError from the same place is a named 422; the server serves on."""
    import cropper_engine.server.routes as server  # where the handlers look prepare up

    def broken_prepare(upload, *args, **kw):
        if upload.filename == "named.tif":
            raise ImageError("named.tif: page 2 of 2 is damaged (its size is missing)")
        raise TypeError("Missing dimensions at /srv/secret/internal.py")

    monkeypatch.setattr(server, "prepare", broken_prepare)
    app = create_app(cfg(), cropper=engine)
    data = photos[0].read_bytes()
    with LiveServer(app, header_timeout_s=30) as srv, caplog.at_level(logging.INFO), uvicorn_logged(caplog):
        s = srv.connect()
        s.sendall(multipart_request("damaged.tif", data, close=True))
        answer = read_all(s).decode()
        s.close()
        assert answer.startswith("HTTP/1.1 500"), answer[:300]
        err = json.loads(answer.partition("\r\n\r\n")[2])["error"]
        assert err == {"type": "internal", "message": server.INTERNAL_MESSAGE}
        assert "TypeError" not in answer and "secret" not in answer and "Missing" not in answer
        s = srv.connect()
        s.sendall(multipart_request("named.tif", data, close=True))
        answer = read_all(s).decode()
        s.close()
        assert answer.startswith("HTTP/1.1 422"), answer[:300]
        assert json.loads(answer.partition("\r\n\r\n")[2])["error"] == {
            "type": "invalid_image", "message": "named.tif: page 2 of 2 is damaged (its size is missing)"}
        # elsewhere in the app too (here /readyz): one traceback, the same plain 500
        monkeypatch.setattr(app.state.cropper_state, "vlm_reachable", lambda: 1 / 0)
        s = srv.connect()
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(s).decode()
        s.close()
        assert answer.startswith("HTTP/1.1 500") and server.INTERNAL_MESSAGE in answer, answer[:300]
        assert "ZeroDivision" not in answer
        metrics = metrics_text(srv)
        assert 'cropper_requests_total{endpoint="crop",status="500"} 1.0' in metrics
        assert 'cropper_requests_total{endpoint="crop",status="422"} 1.0' in metrics
    traced = [r for r in caplog.records if r.exc_info]
    assert len(traced) == 2, [r.getMessage() for r in traced]  # one per 500, not two
    assert "/v1/crop" in traced[0].getMessage() and "/readyz" in traced[1].getMessage()
    assert caplog.text.count("Traceback") == 2
    assert "Exception in ASGI application" not in caplog.text


class BrokenCropper(GatedCropper):
    """The engine with a bug: its crop_batch raises."""

    def crop_batch(self, requests, *args, **kw):
        raise RuntimeError("boom in /srv/secret/engine.py")


def test_server_engine_bug_is_one_traceback_and_a_plain_500(engine, photos, caplog):
    """An exception inside the engine for one request: the engine thread logs its traceback once,
    the answer is the same plain 500 (it named the exception and its message), the engine lives."""
    import cropper_engine.server as server

    with TestClient(create_app(cfg(), cropper=BrokenCropper(engine))) as c, caplog.at_level(logging.INFO):
        r = c.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes())})
        assert error_of(r, 500, "internal") == server.INTERNAL_MESSAGE
        assert "boom" not in r.text and "RuntimeError" not in r.text
        assert c.app.state.cropper_state.engine.alive
    traced = [r for r in caplog.records if r.exc_info]
    assert len(traced) == 1 and "boom" in caplog.text, [r.getMessage() for r in traced]


def damaged_multipage_tiff() -> bytes:
    """A 2-page TIFF saved by Pillow whose second page's IFD lost its ImageWidth tag (renamed
    to an unknown one): Pillow opens the first page and raises `TypeError: Missing dimensions`
    when it seeks to the second (as `n_frames` does)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "TIFF", save_all=True,
                                           append_images=[Image.new("RGB", (64, 48), "blue")])
    data = bytearray(buf.getvalue())
    assert data[:4] == b"II*\0"
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    assert second, "no second page"
    for i in range(struct.unpack_from("<H", data, second)[0]):
        at = second + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 256:  # ImageWidth
            struct.pack_into("<H", data, at, 65000)
            return bytes(data)
    raise AssertionError("the second page has no ImageWidth")


def test_damaged_multipage_tiff_is_what_pillow_raises_on():
    data = damaged_multipage_tiff()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 48)
        with pytest.raises(TypeError, match="Missing dimensions"):
            im.seek(1)
    with Image.open(io.BytesIO(data)) as im, pytest.raises(TypeError, match="Missing dimensions"):
        _ = im.n_frames


def test_server_damaged_multipage_tiff(client):
    r = client.post("/v1/crop", files={"image": ("damaged.tif", damaged_multipage_tiff())})
    msg = error_of(r, 422, "invalid_image")
    assert msg.startswith("damaged.tif: corrupt image") and "export it again" in msg, msg
    assert client.app.state.cropper_state.engine.alive


def test_server_client_gone_while_waiting_for_the_pixel_budget_is_not_decoded(engine, photos, caplog,
                                                                              monkeypatch):
    """A holds the whole pixel budget (its crop held at the engine's door); B waits for its
    share and leaves: B is dropped at once (499, one log line), without being decoded and
    while A still holds the budget; A is answered; the budget ends empty."""
    import cropper_engine.server.routes as server  # where the handlers look prepare up

    decoded = []
    real_prepare = server.prepare

    def counting_prepare(upload, *args, **kw):
        decoded.append(upload.filename)
        return real_prepare(upload, *args, **kw)

    monkeypatch.setattr(server, "prepare", counting_prepare)
    gated = GatedCropper(engine)
    app = create_app(cfg(**{"server.max_pixels_in_flight": 1000}), cropper=gated)
    state = app.state.cropper_state
    data = photos[0].read_bytes()
    with LiveServer(app, header_timeout_s=30) as srv, caplog.at_level(logging.INFO), uvicorn_logged(caplog):
        try:
            a = srv.connect()
            a.sendall(multipart_request("a.jpg", data, close=True))
            assert gated.entered.wait(20)  # A is decoded and at the engine, holding the budget
            b = srv.connect()
            b.sendall(multipart_request("b.jpg", data, close=True))
            assert wait_for(lambda: any(not f.done() for _, f in list(state.budget._waiters))), "B never waited"
            b.close()
            metrics = wait_for(lambda: next((t for t in [metrics_text(srv)] if 'status="499"} 1.0' in t), ""), 10)
            assert 'cropper_requests_total{endpoint="crop",status="499"} 1.0' in metrics, "B was not dropped"
            assert not gated.gate.is_set() and decoded == ["a.jpg"], decoded  # B never decoded
            assert 'cropper_rejected_total{reason="client_gone"} 1.0' in metrics
        finally:
            gated.gate.set()
        answer = read_all(a)
        a.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert wait_for(lambda: state.budget.used == 0, 5), state.budget.used
        assert "cropper_pixels_in_flight 0.0" in metrics_text(srv)
    assert decoded == ["a.jpg"]
    gone = [r.getMessage() for r in caplog.records if "waited for the pixel budget" in r.getMessage()]
    assert len(gone) == 1 and "b.jpg" in gone[0], gone
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_pixel_budget_grant_as_the_wait_is_cancelled_is_given_back():
    """The grant and the cancel in the same turn of the loop: nothing stays held."""
    async def scenario() -> None:
        b = PixelBudget(100)
        await b.acquire(100, 1)
        waiting = asyncio.ensure_future(b.acquire(50, 30))
        await asyncio.sleep(0)
        b.release(100)  # grants the waiter's share (its task not yet resumed) ...
        assert b.used == 50
        waiting.cancel()  # ... and it gives up in the same turn
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert b.used == 0
        await b.acquire(100, 1)  # the whole budget is free again
        with pytest.raises(TimeoutError):
            await b.acquire(10, 0.01)
        b.release(100)
        assert b.used == 0 and not b._waiters

    asyncio.run(scenario())


def test_server_trickled_body_is_cut_off_from_the_start_of_the_body(engine, photos, caplog):
    """100 bytes every 0.3 s: each chunk comes well within the time-out, the body never does.
    The 408 comes at body_timeout_s from the start of the body (a timer restarted at every
    chunk would keep this client connected for ever)."""
    body = photos[0].read_bytes()
    app = create_app(cfg(**{"server.body_timeout_s": 1.0}), cropper=engine)
    with LiveServer(app, header_timeout_s=30) as srv, caplog.at_level(logging.INFO), uvicorn_logged(caplog):
        s = srv.connect()
        stop = threading.Event()

        def trickle() -> None:
            for i in range(0, len(body), 100):
                if stop.wait(0.3):
                    return
                try:
                    s.sendall(body[i:i + 100])
                except OSError:
                    return

        s.sendall(b"POST /v1/crop HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode())
        t0 = time.monotonic()
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        s.settimeout(6)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        took = time.monotonic() - t0
        stop.set()
        sender.join(2)
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), (answer[:200], took)
        assert b"did not arrive within 1 s" in answer
        assert 0.9 <= took < 2.5, took  # from the start of the body, not from the last chunk
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("ratio", [[], "", " , ", "0", "1000"])
def test_server_ratios_that_name_no_ratio_are_refused(client, photos, ratio):
    """The server reads a ratio as the library, the CLI and manifests do (types.parse_ratios): an
    empty list or string, only commas, 0 or a ratio beyond 20:1 is a named 422, never a free-form crop."""
    import base64

    data = base64.b64encode(Path(photos[0]).read_bytes()).decode()
    msg = error_of(client.post("/v1/crop", json={"image": data, "ratio": ratio}), 422)
    assert "ratio" in msg, msg
    if isinstance(ratio, str):
        msg = error_of(client.post("/v1/crop", files={"image": ("a.jpg", Path(photos[0]).read_bytes())},
                                   data={"ratio": ratio}), 422)
        assert "ratio" in msg, msg

# --- issue 23: batch runs and commands ------------------------------------------------------------
#
#   crops over the file-size limit (ulimit -f): none kept truncated  test_crops_over_the_file_size_limit_*
#   a full disk at any point: a clean stop, --resume finishes         test_a_full_disk_stops_the_run_*
#   manifest lines with ../ or absolute paths: nothing outside --out  test_manifest_paths_never_leave_out
#   NUL, lone surrogates, 300-byte and non-UTF-8 names, a long name   test_bad_names_are_each_a_named_error
#   every command's destination checked before the work               test_every_destination_is_checked_*
#   folder walks: linked folders, every decodable type, the rest named test_folder_walk_*, test_walk_takes_*
#   names that are not UTF-8: report, JSON, resume (raw bytes too)    test_names_that_are_not_utf8
#   an interrupted run's crop names taken back, stale temporaries     test_resume_takes_back_*
#   resume with several ratios after a torn row                       test_resume_with_several_ratios_*
#   (CLI wording: --size / --out '' without a folder: tests/test_cli.py; fit: tests/test_fitting.py)

import errno  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from cropper_engine.batch import out_rel  # noqa: E402


def rows_of(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def errors_of(out: Path) -> list[str]:
    path = out / "errors.jsonl"
    return [json.loads(line)["error"] for line in path.read_text().splitlines()] if path.exists() else []


def assert_whole(out: Path, keep: frozenset[str] = frozenset()) -> list[dict]:
    """Every row's crop decodes to its end; OUT/crops holds exactly the rows' crops: no truncated
    file, no temporary, no orphan, no `-1` copy (names in `keep` aside); every line of
    results.jsonl is whole. Returns the rows."""
    rows = rows_of(out)
    for r in rows:
        with Image.open(r["output"]) as im:
            im.load()
    crops = {str(p) for p in (out / "crops").rglob("*") if p.is_file() and p.name not in keep} \
        if (out / "crops").exists() else set()
    assert crops == {str(Path(r["output"])) for r in rows}, (crops, [r["output"] for r in rows])
    cards = out / "report" / "cards.jsonl"
    if cards.exists():
        assert len(cards.read_text().splitlines()) == len(rows)
    return rows


def shoot(photos: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for p in photos:
        shutil.copy(p, folder / p.name)
    return folder


def test_crops_over_the_file_size_limit_are_never_kept(photos, tmp_path):
    """Under `ulimit -f` (RLIMIT_FSIZE in the child): each crop over the limit is a named error
    ("file too large", the limit, the fix), none is kept truncated nor listed in results.jsonl,
    no traceback; --resume (without the limit) crops exactly those again."""
    src = shoot(photos, tmp_path / "in")
    out = tmp_path / "out"
    limit = 64 * 1024

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-c", "from cropper_engine.cli import main; main()", "crop", str(src), "--ratio",
           "1:1,16:9", "--out", str(out), "--report"]
    res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 1, res.stderr
    first = {(Path(r["image"]).name, r["ratio"]) for r in assert_whole(out)}
    errors = errors_of(out)
    assert errors and all("file too large: over this process's file-size limit of 65,536 bytes (ulimit -f 64)"
                          in e and "--resume" in e for e in errors), errors
    assert f"{len(errors)} errors" in res.stderr and "Traceback" not in res.stderr
    res = cli("crop", src, "--ratio", "1:1,16:9", "--out", out, "--report", "--resume")
    assert res.exit_code == 0
    rows = assert_whole(out)
    assert len(rows) == 2 * len(photos)
    big = {(Path(r["image"]).name, r["ratio"]) for r in rows if Path(r["output"]).stat().st_size > limit}
    assert big and first == {(Path(r["image"]).name, r["ratio"]) for r in rows} - big  # exactly those redone
    assert len(errors) == len(big)
    assert not any("-1." in r["output"] for r in rows)


def full_disk_at(monkeypatch, target: str, nth: int) -> None:
    """The disk fills up during the `nth` write of the batch runner to a file whose path holds
    `target` (crops/, results.jsonl, report/thumbs/, cards.jsonl): that write is cut short (half
    of it lands), then it and every later write fail with ENOSPC, as on a full disk."""
    real = os.write
    state = {"n": 0, "full": False}

    def write(fd, data):
        if not state["full"] and target in os.readlink(f"/proc/self/fd/{fd}"):
            state["n"] += 1
            if state["n"] == nth:
                state["full"] = True
                if len(data) > 1:
                    return real(fd, bytes(data[: len(data) // 2]))
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    from cropper_engine.batch import atomic

    monkeypatch.setattr(atomic, "_write", write)  # the one place the batch runner writes bytes


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to tell the files apart")
@pytest.mark.parametrize("target,nth", [("crops/", 1), ("crops/", 3), ("results.jsonl", 2),
                                        ("report/thumbs/", 4), ("cards.jsonl", 3)])
def test_a_full_disk_stops_the_run_cleanly_and_resume_finishes(photos, tmp_path, monkeypatch, target, nth):
    """The disk fills up in the middle of a crop, a results row, a thumbnail or a report card: the
    run stops with a message (disk full, what to do), no traceback, no half row, every row's crop
    whole, every crop with its row and its card; --resume then finishes it, nothing lost or doubled."""
    src = shoot(photos, tmp_path / "in")
    out = tmp_path / "out"
    full_disk_at(monkeypatch, target, nth)
    res = cli("crop", src, "--ratio", "1:1,16:9", "--out", out, "--report")
    assert res.exit_code == 1
    assert "stopped early: " in res.output and "disk full (no space left on the device)" in res.output
    assert "free some space, then run the same command with --resume" in res.output
    assert (out / "results.jsonl").read_bytes().endswith(b"\n") or not (out / "results.jsonl").read_bytes()
    assert len(assert_whole(out)) < 2 * len(photos)
    monkeypatch.undo()
    res = cli("crop", src, "--ratio", "1:1,16:9", "--out", out, "--report", "--resume")
    assert res.exit_code == 0, res.output
    assert "cut short" not in res.output  # nothing half-written was left to repair
    rows = assert_whole(out)
    assert sorted((Path(r["image"]).name, r["ratio"]) for r in rows) == \
        sorted((p.name, r) for p in photos for r in ("1:1", "16:9"))
    assert (out / "report" / "index.html").read_text().count('class="card"') == len(rows)


def test_manifest_paths_never_leave_out(photos, tmp_path):
    """`../`, absolute and `sub/../../` lines write their crops under OUT/crops by their base name;
    a plain `sub/x.jpg` keeps its folder, but never through a link that leads out of crops/."""
    work = tmp_path / "w"
    (work / "lists" / "sub").mkdir(parents=True)
    shutil.copy(photos[0], work / "a.jpg")
    shutil.copy(photos[1], work / "lists" / "sub" / "b.jpg")
    lines = [{"image": "../../w/a.jpg"}, {"image": str(photos[2])}, {"image": "sub/../../a.jpg", "ratio": "1:1"},
             {"image": "sub/b.jpg"}]
    (work / "lists" / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (work / "lists" / "m.txt").write_text("../../w/a.jpg\n")
    out = tmp_path / "o" / "deep"
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "crops").mkdir(parents=True)
    os.symlink(outside, out / "crops" / "sub")  # a link in crops/ to a folder elsewhere
    before = {p for p in tmp_path.rglob("*") if out not in p.parents}
    res = cli("crop", work / "lists" / "m.jsonl", work / "lists" / "m.txt", "--out", out)
    assert res.exit_code == 0, res.output
    assert {p for p in tmp_path.rglob("*") if out not in p.parents} == before  # nothing written outside --out
    names = sorted(Path(r["output"]).relative_to(out / "crops").as_posix() for r in rows_of(out))
    assert out_rel("../../w/a.jpg") == out_rel("/x/a.jpg") == "a.jpg" and out_rel("sub/b.jpg") == "sub/b.jpg"
    assert names == sorted(["a.jpg", photos[2].name, "a_1x1.jpg", "b.jpg", "a-1.jpg"]), names


def test_bad_names_are_each_a_named_error(photos, tmp_path):
    """A NUL in a .jsonl name, a .jsonl line that is not UTF-8, a .txt line in Latin-1 naming no
    file, a 300-byte name: each a named error for its line, the run goes on; a 250-byte name is
    cropped, its crop's name cut to the 255-byte limit."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(photos[0], src / "good.jpg")
    long_name = "l" * 250 + ".jpg"
    shutil.copy(photos[1], src / long_name)
    (src / "m.jsonl").write_bytes(b'{"image": "a\\u0000b.jpg"}\n{"image": "caf\xe9.jpg"}\n'
                                  b'{"image": "\\ud800.jpg"}\n{"image": "good.jpg", "ratio": "16:9"}\n'
                                  + json.dumps({"image": long_name, "ratio": "16:9"}).encode() + b"\n")
    (src / "list.txt").write_bytes(b"good.jpg\nnoth\xe9re.jpg\n")
    too_long = str(src / ("x" * 300 + ".jpg"))
    out = tmp_path / "out"
    res = cli("crop", src / "m.jsonl", src / "list.txt", too_long, "--out", out)
    assert res.exit_code == 1
    errors = errors_of(out)
    expected = [
        f"{src / 'm.jsonl'}:1: bad manifest line (\"image\" \"a\\u0000b.jpg\": its name contains a NUL character",
        f"{src / 'm.jsonl'}:2: bad manifest line (not UTF-8 text: byte 0xe9 at column 15); a .jsonl manifest is "
        "UTF-8: save it as UTF-8",
        f"{src / 'm.jsonl'}:3: bad manifest line (\"image\" \"\\ud800.jpg\": its name contains a lone UTF-16 surrogate",
        f"{src / 'list.txt'}:2: noth\udce9re.jpg: no such file; this line is not UTF-8 text (a list saved in another "
        "encoding, such as Latin-1?): save the list as UTF-8",
        f"{too_long}: a name of 304 bytes; file names here have at most 255, so no such file can exist",
    ]
    assert len(errors) == len(expected), errors
    for want in expected:
        assert sum(e.startswith(want) for e in errors) == 1, (want, errors)
        assert want[:60] in res.output
    rows = assert_whole(out)
    assert sorted((Path(r["image"]).name, str(r["ratio"])) for r in rows) == \
        sorted([("good.jpg", "16:9"), (long_name, "16:9"), ("good.jpg", "None")])
    cut = next(Path(r["output"]).name for r in rows if Path(r["image"]).name == long_name)
    assert len(cut.encode()) == 255 and cut.endswith("~_16x9.jpg")


@pytest.mark.parametrize("command", ["index build", "fit", "eval --rows", "models make-tiny"])
def test_every_destination_is_checked_before_work(photos, tmp_path, command):
    """An unwritable destination is refused before any work, as `crop --out` is, with the same
    words (it was a traceback after all the work)."""
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps({"image": str(p), "crop": [0, 0, 50, 50]}) + "\n" for p in photos))
    bad = "/proc/cropper-x"
    data = ["--dataset", "jsonl", "--annotations", ann]
    args, work = {
        "index build": (["index", "build", *data, "--out", bad, "--embedder", "classical"], "embedder:"),
        "fit": (["fit", *data, "--out", bad], "fitting on"),
        "eval --rows": (["eval", *data, "--rows", f"{bad}/rows.jsonl"], "IoU"),
        "models make-tiny": (["models", "make-tiny", bad], "tiny VLM"),
    }[command]
    res = cli(*args)
    assert res.exit_code == 1, res.output
    assert f"cannot write to {'--rows' if 'rows' in command else 'OUT' if 'tiny' in command else '--out'} " \
           f"{bad}" in res.output and "choose a" in res.output
    assert work not in res.output  # refused before the work


def test_folder_walk_follows_linked_folders_and_names_what_it_does_not_read(photos, tmp_path):
    """A walk enters a symbolic link to a folder (a loop back up is named, not followed), takes
    every type Pillow decodes here (.jfif .jpe .pgm .ppm .j2k .avif, as given one by one), and
    names every file it passes over with why, in OUT/skipped.jsonl and the summary (rc 0)."""
    from cropper_engine.batch import walk_suffixes

    src = tmp_path / "in"
    (src / "real").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(photos[0], src / "real" / "a.jpg")
    os.symlink(elsewhere, src / "linked")
    os.symlink(src, src / "real" / "up")  # a loop
    im = Image.open(photos[1]).convert("RGB").resize((160, 120))
    taken = {"a.jpg"}
    for name, mode in (("b.jfif", "RGB"), ("c.jpe", "RGB"), ("d.pgm", "L"), ("e.ppm", "RGB"), ("f.j2k", "RGB"),
                       ("g.avif", "RGB")):
        if Path(name).suffix in walk_suffixes():
            im.convert(mode).save(elsewhere / name)
            taken.add(name)
    assert {"b.jfif", "c.jpe", "d.pgm", "e.ppm"} <= taken
    if ".heic" in walk_suffixes():  # pillow-heif installed: a real HEIC, taken
        im.save(elsewhere / "h.heic")
        taken.add("h.heic")
    else:
        (elsewhere / "h.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 16)
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.jpg").write_bytes(photos[0].read_bytes())
    out = tmp_path / "out"
    res = cli("crop", src, "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(Path(r["image"]).name for r in assert_whole(out)) == sorted(taken)
    lines = (out / "skipped.jsonl").read_text().splitlines()
    skipped = {Path(d["file"]).name: d["reason"] for d in map(json.loads, lines)}
    want = {"notes.txt": "not an image type Pillow decodes here (.txt; name it alone to try it anyway)",
            ".hidden.jpg": "a hidden file (its name starts with '.')",
            "up": f"a folder this run reads already (a link to {src}): a loop of links"}
    if ".heic" not in walk_suffixes():
        want["h.heic"] = "no HEIC decoder installed (pip install pillow-heif)"
    assert set(skipped) == set(want), skipped
    for name, why in want.items():
        assert skipped[name].startswith(why), (name, skipped[name])
        assert why[:40] in res.output
    assert f"{len(want)} not read" in res.output and "0 errors" in res.output


def without_heif(monkeypatch):
    """Pillow as it is where pillow-heif is not installed: no HEIF opener, no .heic extension."""
    from PIL import Image as PILImage

    PILImage.init()
    monkeypatch.setattr(PILImage, "ID", [f for f in PILImage.ID if f != "HEIF"])
    if "HEIF" in PILImage.OPEN:
        monkeypatch.delitem(PILImage.OPEN, "HEIF")
    for ext in [e for e, f in PILImage.EXTENSION.items() if f == "HEIF"]:
        monkeypatch.delitem(PILImage.EXTENSION, ext)


def test_walk_takes_heic_when_a_decoder_is_registered(tmp_path, monkeypatch):
    """A plugin registered with Pillow for .heic (as pillow-heif's opener is, when imageio is
    imported) makes the walk take .heic files; without one they are named as skipped, and a HEIC
    named alone is an error saying what to install."""
    from PIL import Image as PILImage

    from cropper_engine.batch import iter_inputs

    (tmp_path / "x.heic").write_bytes(b"\0" * 32)
    with monkeypatch.context() as mp:
        without_heif(mp)
        seen: list[tuple[str, str]] = []
        assert [i.rel for i in iter_inputs([str(tmp_path)], print, on_skip=lambda p, w: seen.append((p, w)))] == []
        assert seen == [(str(tmp_path / "x.heic"), "no HEIC decoder installed (pip install pillow-heif)")]
        with pytest.raises(ImageError, match=r"x.heic: no HEIC decoder installed \(pip install pillow-heif\)"):
            open_image(tmp_path / "x.heic")
        PILImage.init()
        mp.setitem(PILImage.EXTENSION, ".heic", "JPEG")  # stands in for register_heif_opener()
        assert [i.rel for i in iter_inputs([str(tmp_path)], print)] == ["x.heic"]
    need_module("pillow_heif", "pillow-heif (a dependency: HEIC photos)")
    assert [i.rel for i in iter_inputs([str(tmp_path)], print)] == ["x.heic"]  # registered at import


def test_names_that_are_not_utf8(photos, tmp_path):
    """A file name that is not UTF-8 is cropped, written as \\udcXX in results.jsonl, errors.jsonl,
    on the terminal and in the report alike (the summary is printed); --resume knows it, also
    when another tool wrote results.jsonl with the raw byte."""
    src = tmp_path / "in"
    src.mkdir()
    name = os.fsdecode(os.fsencode(str(src)) + b"/caf\xe9.jpg")
    shutil.copy(photos[0], name)
    out = tmp_path / "out"
    res = cli("crop", src, "--out", out, "--report")
    assert res.exit_code == 0 and "1 images, 1 crops" in res.output
    (row,) = assert_whole(out)
    assert row["image"] == name and Path(row["output"]).name == "caf\udce9.jpg"
    assert "caf\\udce9.jpg" in (out / "results.jsonl").read_text()
    assert "caf\\udce9.jpg" in (out / "report" / "index.html").read_text()
    assert "1 skipped" in cli("crop", src, "--out", out, "--resume").output
    results = out / "results.jsonl"
    results.write_bytes(results.read_bytes().replace(b"\\udce9", b"\xe9"))  # the raw byte, invalid UTF-8
    res = cli("crop", src, "--out", out, "--resume", "--report")
    assert res.exit_code == 0 and "1 skipped" in res.output and "0 errors" in res.output
    gone = os.fsdecode(os.fsencode(str(src)) + b"/gon\xe9.jpg")
    res = cli("crop", gone, "--out", tmp_path / "o2")
    assert res.exit_code == 1 and f"error: {src}/gon\\udce9.jpg: no such file" in res.output
    assert f"{src}/gon\\udce9.jpg: no such file" in (tmp_path / "o2" / "errors.jsonl").read_text()


def test_resume_takes_back_the_names_an_interrupted_run_left(photos, tmp_path):
    """Killed between a crop's rename and its row: --resume crops it again under the same name (no
    orphan beside a `-1` copy); the temporaries of killed runs go, a live process's stay."""
    out = tmp_path / "out"
    two = photos[:2]
    assert cli("crop", *two, "--ratio", "1:1,16:9", "--out", out).exit_code == 0
    results = out / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:-1]))  # the last crop is on disk, its row is not
    stale = out / "crops" / ".cropper-99999999-3.part"
    live = out / "crops" / ".cropper-1-3.part"  # pid 1: alive
    stale.write_bytes(b"half a crop")
    live.write_bytes(b"being written")
    res = cli("crop", *two, "--ratio", "1:1,16:9", "--out", out, "--resume")
    assert res.exit_code == 0 and "1 images, 1 crops" in res.output
    rows = assert_whole(out, keep=frozenset({live.name}))
    assert len(rows) == 4 and not any("-1." in r["output"] for r in rows)
    assert json.loads(lines[-1])["output"] == rows[-1]["output"]
    assert not stale.exists() and live.exists()


def test_resume_with_several_ratios_after_a_torn_row(photos, tmp_path):
    """Killed while writing the 16:9 row of an image with three ratios (its 16:9 crop on disk, its
    4:5 not yet): --resume crops exactly its 16:9 and 4:5 again, each once, under their own names."""
    out = tmp_path / "out"
    two = photos[:2]
    args = ("crop", *two, "--ratio", "1:1,16:9,4:5", "--out", out)
    assert cli(*args).exit_code == 0
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 6
    last = Path(two[1]).name
    kept = [r for r in rows if not (Path(r["image"]).name == last and r["ratio"] in ("16:9", "4:5"))]
    torn = next(r for r in rows if Path(r["image"]).name == last and r["ratio"] == "16:9")
    Path(next(r for r in rows if Path(r["image"]).name == last and r["ratio"] == "4:5")["output"]).unlink()
    results.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in kept) + json.dumps(torn).encode()[:60])
    res = cli(*args, "--resume")
    assert res.exit_code == 0 and "cut short" in res.output
    assert "1 images, 2 crops" in res.output and "1 skipped" in res.output
    again = assert_whole(out)
    assert sorted((Path(r["image"]).name, r["ratio"]) for r in again) == \
        sorted((Path(r["image"]).name, r["ratio"]) for r in rows)
    assert sorted(r["output"] for r in again) == sorted(r["output"] for r in rows)  # the same names


def test_manifest_ratios_that_name_no_ratio_are_errors(photos, tmp_path):
    """A manifest line's "ratio" is read as everywhere (types.parse_ratios): "", [], 0 or a list
    that names nothing is a named error for that line, never a free-form crop; a nested comma
    list gives every ratio it names."""
    src = tmp_path / "in"
    src.mkdir()
    name = Path(photos[0]).name
    (src / name).write_bytes(Path(photos[0]).read_bytes())
    lines = [{"image": name, "ratio": bad} for bad in ("", [], 0, " , ")] + \
        [{"image": name, "ratio": ["1:1,16:9", "4:5"]}]
    (src / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    res = cli("crop", src / "m.jsonl", "--out", out)
    assert res.exit_code == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["ratio"] for r in rows) == ["16:9", "1:1", "4:5"]
    errors = [json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 4 and all("bad manifest line" in e and "ratio" in e for e in errors), errors
