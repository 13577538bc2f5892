"""`sdrt serve` against real clients written by others (webuiapi, openai, httpx), on the
built-in tiny SD 1.5 model, loopback only. The oracle for pixels is `sdrt generate` (and
`Pipeline.__call__`) with the same settings and seed."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from serve_helpers import free_port, serving, start_server   # noqa: E402
from test_inputs import _png_with_size   # noqa: E402 - the runtime's decompression-bomb header

from sdrt.serve.config import ServeConfig   # noqa: E402

PROMPT = "a watercolor fox"


def config(art: Path, **kw) -> ServeConfig:
    return ServeConfig(artifacts=(art,), port=free_port(), **kw)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def b64png(png: bytes) -> str:
    return base64.b64encode(png).decode()


def generate_cli(art: Path, out: Path, *flags: str) -> tuple[np.ndarray, str]:
    """`sdrt generate` itself, as a user runs it: the pixels and the PNG's parameters text."""
    from sdrt.cli.main import main

    assert main(["generate", str(art), "--out", str(out), "--force", *flags]) == 0
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")), im.info["parameters"]


class SlowSteps:
    """The served pipeline with a pause after each denoising step, so a job lasts long
    enough to be queued behind, interrupted or timed out. Everything else is the real
    pipeline and the real executor."""

    def __init__(self, pipe, seconds: float, started: threading.Event | None = None):
        self.pipe, self.seconds, self.started = pipe, seconds, started

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, on_step=None, **kw):
        def step(i, n):
            if self.started is not None:
                self.started.set()
            time.sleep(self.seconds)
            if on_step is not None:
                on_step(i, n)
        return self.pipe(on_step=step, **kw)


def slow(server, seconds: float) -> threading.Event:
    ex = server.executor
    name = next(iter(ex.models))
    started = threading.Event()
    ex._pipes[name] = SlowSteps(ex._pipes[name], seconds, started)
    return started


@pytest.fixture(scope="module")
def server(sd15_artifacts):
    with serving(config(sd15_artifacts, max_queue=4)) as s:
        yield s


# -- same pixels as sdrt generate, through real clients --------------------------------------------

def test_webuiapi_txt2img_gives_sdrt_generates_pixels(server, sd15_artifacts, tmp_path):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=42, cfg_scale=7.0, width=128, height=128,
                         batch_size=2)
    expected0, text0 = generate_cli(sd15_artifacts, tmp_path / "a.png", "--prompt", PROMPT, "--negative-prompt",
                                    "blurry", "--seed", "42", "--steps", "4", "--scheduler", "Euler a",
                                    "--guidance", "7")
    expected1, _ = generate_cli(sd15_artifacts, tmp_path / "b.png", "--prompt", PROMPT, "--negative-prompt",
                                "blurry", "--seed", "43", "--steps", "4", "--scheduler", "Euler a", "--guidance", "7")
    assert len(result.images) == 2
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), expected0)
    assert np.array_equal(np.asarray(result.images[1].convert("RGB")), expected1)   # image i: seed + i
    assert result.info["all_seeds"] == [42, 43]
    assert result.info["infotexts"][0] == text0
    assert result.images[0].info["parameters"] == text0    # the PNG carries its settings, as the web UI's
    assert result.info["sd_model_name"] == "sdrt-tiny-sd15" or result.info["sd_model_name"]


def test_openai_images_generate_gives_sdrt_generates_pixels(server, sd15_artifacts, tmp_path):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.images.generate(prompt=PROMPT, n=1, size="128x128", response_format="b64_json",
                                 extra_body={"seed": 7, "steps": 3})
    expected, _ = generate_cli(sd15_artifacts, tmp_path / "o.png", "--prompt", PROMPT, "--seed", "7",
                               "--steps", "3")
    assert np.array_equal(pixels(base64.b64decode(out.data[0].b64_json)), expected)
    # OpenAI's own model names pick the served model; the size must be the artifact's
    client.images.generate(prompt=PROMPT, model="dall-e-3", extra_body={"steps": 1})
    with pytest.raises(openai.BadRequestError, match="generates 128x128"):
        client.images.generate(prompt=PROMPT, size="1024x1024")
    with pytest.raises(openai.NotFoundError, match="no model 'nope'"):
        client.images.generate(prompt=PROMPT, model="nope")


def test_img2img_and_inpainting_match_the_pipeline(server, sd15_artifacts):
    from sdrt.runtime.pipeline import Pipeline

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 160)).resize((160, 96))
    mask.paste(255, (40, 20, 120, 80))
    buf, mbuf = io.BytesIO(), io.BytesIO()
    init.save(buf, "PNG")
    mask.save(mbuf, "PNG")
    body = {"prompt": PROMPT, "init_images": [b64png(buf.getvalue())], "denoising_strength": 0.6, "steps": 4,
            "seed": 3, "sampler_name": "Euler", "width": 128, "height": 128}
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    masked = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=60, json={
        **body, "mask": b64png(mbuf.getvalue()), "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False})
    assert masked.status_code == 200, masked.text
    with Pipeline.load(sd15_artifacts) as pipe:
        want = pipe(PROMPT, image=init, strength=0.6, steps=4, seed=3, scheduler="Euler").images[0]
        want_masked = pipe(PROMPT, image=init, mask_image=mask, strength=0.6, steps=4, seed=3,
                           scheduler="Euler").images[0]
    assert np.array_equal(pixels(base64.b64decode(r.json()["images"][0])), np.asarray(want))
    assert np.array_equal(pixels(base64.b64decode(masked.json()["images"][0])), np.asarray(want_masked))


def test_openai_edit_repaints_the_masks_transparent_area(server, sd15_artifacts):
    import openai

    from sdrt.runtime.pipeline import Pipeline

    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 32, 96, 96))   # transparent = edit, as OpenAI's masks
    files = []
    for im in (init, mask):
        b = io.BytesIO()
        im.save(b, "PNG")
        files.append(b.getvalue())
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.images.edit(image=("in.png", files[0], "image/png"), mask=("mask.png", files[1], "image/png"),
                             prompt=PROMPT, extra_body={"seed": 5, "steps": 3})
    white = Image.new("L", (128, 128))
    white.paste(255, (32, 32, 96, 96))
    with Pipeline.load(sd15_artifacts) as pipe:
        want = pipe(PROMPT, image=init, mask_image=white, steps=3, seed=5).images[0]
    assert np.array_equal(pixels(base64.b64decode(out.data[0].b64_json)), np.asarray(want))
    with pytest.raises(openai.BadRequestError, match="no alpha channel"):
        client.images.edit(image=("in.png", files[0], "image/png"), mask=("m.png", files[0], "image/png"),
                           prompt=PROMPT)


# -- the web UI's other routes ---------------------------------------------------------------------

def test_listing_routes_speak_the_web_uis_shapes(server):
    samplers = httpx.get(f"{server.url}/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in samplers
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] and models[0]["width"] == 128 and models[0]["title"].startswith(
        models[0]["model_name"])
    progress = httpx.get(f"{server.url}/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    docs = httpx.get(f"{server.url}/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert httpx.get(f"{server.url}/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/sdapi/v1/txt2img", "/v1/images/generations", "/v1/images/edits"} <= set(spec["paths"])


def test_png_info_reads_back_what_txt2img_wrote(server):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 11}, timeout=60)
    image = r.json()["images"][0]
    info = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": image}).json()
    assert info["info"] == json.loads(r.json()["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == PROMPT and info["parameters"]["Seed"] == "11"


@pytest.mark.parametrize("field,value,named", [
    ("enable_hr", True, "enable_hr"),
    ("restore_faces", True, "restore_faces"),
    ("width", 512, "width=512"),
    ("subseed_strength", 0.5, "subseed_strength"),
    ("styles", ["cinematic"], "styles"),
    ("s_churn", 1.0, "s_churn"),
    ("override_settings", {"sd_vae": "other.vae.pt"}, "sd_vae"),
    ("sampler_name", "DPM++ 3M SDE", "DPM++ 3M SDE"),
    ("steps", 0, "steps"),
    ("batch_size", 100, "batch_size x n_iter"),
    ("seed", -5, "seed"),
])
def test_a_field_that_would_change_the_image_and_cannot_be_honoured_is_a_422_naming_it(server, field, value, named):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, field: value}, timeout=30)
    assert r.status_code == 422, r.text
    assert named in r.json()["detail"]


def test_harmless_unknown_fields_are_ignored(server):
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, "save_images": True, "do_not_save_grid": True,
            "eta": 1.0, "s_noise": 1, "comments": {"x": 1}, "some_plugin_field": [1, 2]}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=30)
    assert r.status_code == 200, r.text


# -- hostile input ---------------------------------------------------------------------------------

def _png(size=(8, 8)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size).save(b, "PNG")
    return b.getvalue()


def _encoded(fmt: str) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, fmt)
    return b.getvalue()


@pytest.mark.parametrize("init,message", [
    ("not base64!!", "not valid base64"),
    (b64png(_png()[:30]), "damaged or truncated PNG"),
    (b64png(b"GIF89a" + bytes(30)), "GIF image"),
    (b64png(b""), "empty"),
    (b64png(b"hello, I am text"), "text file"),
    (12345, "init_images.0: Input should be a valid string"),
    (b64png(_png_with_size(50000, 50000)), "too large to decode safely"),   # a decompression bomb's header
    (b64png(_png_with_size(9000, 9000)), "over this server's limit"),
    (b64png(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))), "not a PNG, JPEG or WebP"),
    (b64png(_encoded("BMP")), "BMP image"),
    ("data:image/png;base64," + b64png(_png()[:40]), "truncated"),
])
def test_bad_images_are_refused_with_4xx_and_the_server_keeps_serving(server, init, message):
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"prompt": "x", "init_images": [init], "steps": 2},
                   timeout=30)
    assert 400 <= r.status_code < 500 and message in r.text, r.text
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


@pytest.mark.parametrize("mask,message", [
    (Image.new("L", (128, 64)), "selects nothing to repaint"),         # all black
    (Image.new("RGB", (8, 8), (255, 255, 255)), "aspect"),            # another aspect ratio than the image
])
def test_bad_masks_are_refused_with_4xx(server, mask, message):
    image, m = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (128, 64)).save(image, "PNG")
    mask.save(m, "PNG")
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=30, json={
        "prompt": "x", "init_images": [b64png(image.getvalue())], "mask": b64png(m.getvalue()), "steps": 2,
        "inpaint_full_res": False, "mask_blur": 0})
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(sd15_artifacts):
    with serving(config(sd15_artifacts, max_image_pixels=64 * 64)) as s:
        r = httpx.post(f"{s.url}/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64png(_png((65, 64)))]})
        assert r.status_code == 422 and "over this server's limit" in r.json()["detail"]


def test_malformed_and_oversized_bodies_get_4xx(sd15_artifacts):
    with serving(config(sd15_artifacts, max_body_bytes=2**16)) as s:
        post = lambda **kw: httpx.post(f"{s.url}/sdapi/v1/txt2img", timeout=30, **kw)   # noqa: E731
        assert post(content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
        assert post(json=["a", "list"]).status_code == 422
        assert post(json={"prompt": PROMPT, "steps": "many"}).status_code == 422
        assert post(json={"prompt": "x" * 70_000}).status_code == 413   # Content-Length over the limit

        def chunks():   # no Content-Length: counted as it arrives
            for _ in range(100):
                yield b" " * 1024
        assert post(content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413
        bad = httpx.post(f"{s.url}/v1/images/edits", content=b"--x\r\nnot a form", timeout=30,
                         headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert bad.status_code == 400 and "error" in bad.json()
        r = httpx.post(f"{s.url}/v1/images/generations", json={"n": 1})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert post(json={"prompt": PROMPT, "steps": 1}).status_code == 200   # still serving


# -- security --------------------------------------------------------------------------------------

def test_the_api_key_is_required_on_every_route_but_health(sd15_artifacts):
    import openai

    key = "s3cret-key-123"
    with serving(config(sd15_artifacts, api_key=key)) as s:
        for path in ("/sdapi/v1/samplers", "/metrics", "/", "/docs", "/v1/models"):
            r = httpx.get(f"{s.url}{path}")
            assert r.status_code == 401, path
            assert "Basic" in r.headers["WWW-Authenticate"]
        assert httpx.get(f"{s.url}/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{s.url}/sdapi/v1/samplers", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(f"{s.url}/sdapi/v1/samplers", auth=("anyone", key)).status_code == 200   # a browser
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0)
        assert client.images.generate(prompt=PROMPT, extra_body={"steps": 1}).data[0].b64_json
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt=PROMPT)


def test_a_non_loopback_bind_needs_an_api_key(sd15_artifacts):
    import subprocess
    import sys

    from sdrt.engines.errors import InvalidInput

    with pytest.raises(InvalidInput, match="--api-key"):
        ServeConfig(artifacts=(sd15_artifacts,), host="0.0.0.0")
    ServeConfig(artifacts=(sd15_artifacts,), host="0.0.0.0", api_key="long-enough-key")   # accepted
    ServeConfig(artifacts=(sd15_artifacts,), host="0.0.0.0", insecure_no_auth=True)      # accepted, on purpose
    ServeConfig(artifacts=(sd15_artifacts,), host="::1")                                # loopback
    run = subprocess.run([sys.executable, "-m", "sdrt.cli.main", "serve", str(sd15_artifacts), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--api-key" in run.stderr and "not a loopback address" in run.stderr


def test_cors_is_off_unless_asked(server, sd15_artifacts):
    origin = {"Origin": "http://example.test"}
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/sdapi/v1/samplers", headers=origin).headers
    with serving(config(sd15_artifacts, cors_origins=("http://example.test",))) as s:
        r = httpx.get(f"{s.url}/sdapi/v1/samplers", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.test"


def test_prompts_are_not_logged_unless_asked(server, caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        assert httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a secret prompt", "steps": 1},
                          timeout=30).status_code == 200
    assert "POST /sdapi/v1/txt2img 200" in caplog.text
    assert "secret" not in caplog.text


def test_loras_are_names_inside_the_lora_dir(sd15_artifacts, tiny_sd15, tmp_path):
    from sdrt.export.tiny_lora import make_tiny_lora
    from sdrt.runtime.pipeline import Pipeline

    folder = tmp_path / "loras"
    folder.mkdir()
    lora = make_tiny_lora(folder / "style.safetensors", variant="sd15")
    with serving(config(sd15_artifacts, lora_dir=folder)) as s:
        body = {"prompt": f"{PROMPT} <lora:style:0.5>", "steps": 2, "seed": 9}
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json=body, timeout=60)
        assert r.status_code == 200, r.text
        with Pipeline.load(sd15_artifacts) as pipe:
            want = pipe(PROMPT + " ", steps=2, seed=9, loras=[(lora, 0.5)]).images[0]
            base = pipe(PROMPT + " ", steps=2, seed=9).images[0]
        got = pixels(base64.b64decode(r.json()["images"][0]))
        assert np.array_equal(got, np.asarray(want)) and not np.array_equal(got, np.asarray(base))
        assert httpx.get(f"{s.url}/sdapi/v1/loras").json() == [{"name": "style", "alias": "style"}]
        for name in ("../style", "/etc/passwd", "..", "sub/style", "missing"):
            r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": f"x <lora:{name}:1>", "steps": 1})
            assert r.status_code == 422 and "LoRA" in r.json()["detail"], name


def test_embeddings_are_files_in_the_embedding_dir_triggered_by_name(sd15_artifacts, tmp_path):
    from sdrt.export.tiny import make_tiny_embedding
    from sdrt.runtime.pipeline import Pipeline

    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = make_tiny_embedding(folder / "charturner.safetensors", variant="sd15")
    with serving(config(sd15_artifacts, embedding_dir=folder)) as s:
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "a fox, charturner", "steps": 2, "seed": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{s.url}/sdapi/v1/embeddings").json() == {"loaded": {"charturner": {}}, "skipped": {}}
    with Pipeline.load(sd15_artifacts) as pipe:
        want = pipe("a fox, charturner", steps=2, seed=4, embeddings=[(path, "charturner")]).images[0]
        plain = pipe("a fox, charturner", steps=2, seed=4).images[0]
    got = pixels(base64.b64decode(r.json()["images"][0]))
    assert np.array_equal(got, np.asarray(want)) and not np.array_equal(got, np.asarray(plain))


# -- behaviour under load --------------------------------------------------------------------------

def test_concurrent_requests_each_get_their_own_image(server, sd15_artifacts):
    from sdrt.runtime.pipeline import Pipeline

    seeds = list(range(100, 106))
    results: dict[int, httpx.Response] = {}

    def ask(seed: int) -> None:
        results[seed] = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                                   json={"prompt": f"{PROMPT} {seed}", "steps": 2, "seed": seed})

    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [s for s in seeds if results[s].status_code == 200]
    assert all(results[s].status_code in (200, 429) for s in seeds), {s: results[s].text for s in seeds}
    assert len(ok) >= 5   # max_queue 4 and one running: at most one may be turned away
    with Pipeline.load(sd15_artifacts) as pipe:
        for s in ok:
            want = pipe(f"{PROMPT} {s}", steps=2, seed=s).images[0]
            assert np.array_equal(pixels(base64.b64decode(results[s].json()["images"][0])), np.asarray(want))


def test_a_full_queue_answers_429_with_retry_after_and_nothing_else(sd15_artifacts):
    with serving(config(sd15_artifacts, max_queue=2)) as s:
        started = slow(s, 0.05)
        codes, lock = [], threading.Lock()

        def ask(i: int) -> None:
            r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4, "seed": i}, timeout=60)
            with lock:
                codes.append((r.status_code, r.headers.get("Retry-After"), r.json()))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        threads[0].start()
        started.wait(10)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(c for c, _, _ in codes)
        assert set(statuses) == {200, 429} and statuses.count(200) == 3, statuses   # 1 running + 2 queued
        for code, retry, body in codes:
            if code == 429:
                assert int(retry) >= 1 and "queue is full" in body["detail"]
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'sdrt_jobs_rejected_total{reason="queue_full"} 5.0' in metrics
        assert 'sdrt_requests_total{route="/sdapi/v1/txt2img",status="429"} 5.0' in metrics


def test_deadline_drops_a_queued_job_and_stops_a_running_one(sd15_artifacts):
    with serving(config(sd15_artifacts, deadline_s=0.6)) as s:
        slow(s, 0.35)   # the running job stops at its first step after 0.6 s, past the queued one's deadline
        out = {}

        def ask(name: str) -> None:
            t0 = time.monotonic()
            out[name] = (httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 20}, timeout=60),
                         time.monotonic() - t0)

        a = threading.Thread(target=ask, args=("running",))
        a.start()
        time.sleep(0.1)
        b = threading.Thread(target=ask, args=("queued",))
        b.start()
        a.join()
        b.join()
        for name in ("running", "queued"):
            r, seconds = out[name]
            assert r.status_code == 504, r.text
            assert "deadline of 0.6 s passed" in r.json()["detail"] and seconds < 3   # 20 steps would take 7 s
        assert "while the job was generating" in out["running"][0].json()["detail"]
        # a client may ask for less than the server's deadline, never more
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 20},
                       headers={"X-Sdrt-Deadline": "0.2"}, timeout=60)
        assert r.status_code == 504 and "deadline of 0.2 s passed" in r.json()["detail"]
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1},
                       headers={"X-Sdrt-Deadline": "soon"}, timeout=60)
        assert r.status_code == 422 and "X-Sdrt-Deadline" in r.json()["detail"]
        assert "while the job was queued" in out["queued"][0].json()["detail"]


def test_a_queued_request_whose_client_disconnects_is_dropped(sd15_artifacts):
    with serving(config(sd15_artifacts)) as s:
        started = slow(s, 0.1)
        first = threading.Thread(target=lambda: httpx.post(f"{s.url}/sdapi/v1/txt2img",
                                                           json={"prompt": "x", "steps": 10}, timeout=60))
        first.start()
        started.wait(10)
        with pytest.raises(httpx.ReadTimeout):   # the client gives up while its job waits
            httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "gone", "steps": 10}, timeout=0.3)
        deadline = time.monotonic() + 5
        while s.executor.queue_depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.executor.queue_depth() == 0   # dropped while the first job still runs
        first.join()
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'sdrt_jobs_rejected_total{reason="disconnected"} 1.0' in metrics
        assert 'sdrt_images_generated_total{model="sdrt-tiny-sd15"} 1.0' in metrics or \
            "sdrt_images_generated_total" in metrics and metrics.count(" 1.0") >= 1


def test_interrupt_stops_the_running_generation_between_steps(sd15_artifacts):
    with serving(config(sd15_artifacts)) as s:
        started = slow(s, 0.1)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
            f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 50, "sampler_name": "Euler"}, timeout=60)))
        t0 = time.monotonic()
        t.start()
        started.wait(10)
        time.sleep(0.25)
        progress = httpx.get(f"{s.url}/sdapi/v1/progress").json()
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 50
        assert httpx.post(f"{s.url}/sdapi/v1/interrupt").json() == {"interrupted": 1}
        t.join()
        assert out["r"].status_code == 409 and "interrupted" in out["r"].json()["detail"]
        assert time.monotonic() - t0 < 3   # 50 steps would take 5 s
        assert httpx.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200


def test_metrics_count_requests_stages_and_images(server):
    httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1}, timeout=30)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ('sdrt_requests_total{route="/sdapi/v1/txt2img",status="200"}', "sdrt_request_seconds_bucket",
                 "sdrt_queue_wait_seconds_count", 'sdrt_stage_seconds_count{stage="unet"}',
                 'sdrt_stage_seconds_count{stage="text_encoder"}', "sdrt_queue_depth",
                 "sdrt_images_generated_total", "sdrt_model_load_seconds", "sdrt_ready 1.0"):
        assert name in text, name


def test_the_server_binds_at_once_and_is_ready_when_loaded(sd15_artifacts):
    with start_server([sd15_artifacts], ready=False) as s:
        deadline, seen = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{s.url}/v2/health/ready", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            seen.add(r.status_code)
            if r.status_code == 200:
                break
            assert r.json()["ready"] is False
            time.sleep(0.02)
        assert 200 in seen
        assert httpx.get(f"{s.url}/v2/health/live").status_code == 200


def test_a_batch_artifact_runs_concurrent_requests_in_one_engine_call(sd15_artifacts, sd15_batch2_artifacts):
    """Two requests with their own prompts and seeds share one call of a --batch 2
    artifact, and each gets the image the batch-1 artifact gives for its seed."""
    from sdrt.runtime.pipeline import Pipeline

    with serving(config(sd15_batch2_artifacts, batch_wait_ms=2000)) as s:
        out = {}

        def ask(seed: int) -> None:
            out[seed] = httpx.post(f"{s.url}/sdapi/v1/txt2img", timeout=60, json={
                "prompt": f"fox {seed}", "steps": 3, "seed": seed, "sampler_name": "Euler a"})

        threads = [threading.Thread(target=ask, args=(seed,)) for seed in (21, 22)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{s.url}/metrics").text
        # one call of two images, not two calls padded with copies
        assert 'sdrt_batch_items_bucket{le="1.0"} 0.0' in metrics and "sdrt_batch_items_count 1.0" in metrics
        single = httpx.post(f"{s.url}/sdapi/v1/txt2img", timeout=60,
                            json={"prompt": "fox 23", "steps": 3, "seed": 23, "sampler_name": "Euler a"})
    with Pipeline.load(sd15_artifacts) as pipe:
        for seed, r in [*out.items(), (23, single)]:   # the lone request: padded, same image
            assert r.status_code == 200, r.text
            want = pipe(f"fox {seed}", steps=3, seed=seed, scheduler="Euler a").images[0]
            got = pixels(base64.b64decode(r.json()["images"][0])).astype(int)
            assert np.abs(got - np.asarray(want, dtype=int)).max() <= 1   # another batch size: float rounding


def test_a_request_picks_its_model_by_name(sd15_artifacts, sd2_artifacts):
    import openai

    from sdrt.runtime.pipeline import Pipeline

    cfg = ServeConfig(artifacts=(sd15_artifacts, sd2_artifacts), port=free_port())
    with serving(cfg) as s:
        models = httpx.get(f"{s.url}/sdapi/v1/sd-models").json()
        assert len(models) == 2
        second = models[1]
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", timeout=60, json={
            "prompt": PROMPT, "steps": 2, "seed": 8, "override_settings": {"sd_model_checkpoint": second["title"]}})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["sd_model_name"] == second["model_name"]
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        by_name = client.images.generate(prompt=PROMPT, model=second["model_name"], extra_body={"seed": 8, "steps": 2})
        missing = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "other [0123456789]"}})
        assert missing.status_code == 404 and second["title"] in missing.json()["detail"]
    with Pipeline.load(sd2_artifacts) as pipe:
        want = np.asarray(pipe(PROMPT, steps=2, seed=8).images[0])
    assert np.array_equal(pixels(base64.b64decode(r.json()["images"][0])), want)
    assert np.array_equal(pixels(base64.b64decode(by_name.data[0].b64_json)), want)


def test_the_server_loads_no_torch(sd15_artifacts):
    # a serving machine needs the runtime's dependencies and the serve extra only
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from sdrt.serve.app import create_app; "
            "from sdrt.serve.config import ServeConfig; "
            f"create_app(ServeConfig(artifacts=(Path({str(sd15_artifacts)!r}),))); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
