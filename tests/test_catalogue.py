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
from PIL import Image

from bench.memory_bench import big_png
from cropper_engine.cli import main
from cropper_engine.config import load_config
from cropper_engine.errors import ConfigError, ImageError
from cropper_engine.imageio import format_pixels, open_image

pytest.importorskip("fastapi", reason="the server extra is not installed")
uvicorn = pytest.importorskip("uvicorn")
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
    assert "10000 MP" in str(exc.value) or "1e+04 MP" in str(exc.value)


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

from cropper_engine import batch as batch_module  # noqa: E402
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

    monkeypatch.setattr(batch_module, "_write", write)


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


def test_walk_takes_heic_when_a_decoder_is_registered(tmp_path, monkeypatch):
    """A plugin registered with Pillow for .heic (as pillow-heif's opener is) makes the walk take
    .heic files; without one they are named as skipped."""
    from PIL import Image as PILImage

    from cropper_engine.batch import iter_inputs

    (tmp_path / "x.heic").write_bytes(b"\0" * 32)
    seen: list[tuple[str, str]] = []
    assert [i.rel for i in iter_inputs([str(tmp_path)], print, on_skip=lambda p, w: seen.append((p, w)))] == []
    assert seen == [(str(tmp_path / "x.heic"), "no HEIC decoder installed (pip install pillow-heif)")]
    PILImage.init()
    monkeypatch.setitem(PILImage.EXTENSION, ".heic", "JPEG")  # stands in for register_heif_opener()
    assert [i.rel for i in iter_inputs([str(tmp_path)], print)] == ["x.heic"]


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
