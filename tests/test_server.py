"""The HTTP service through an HTTP client: answers, every kind of bad upload, limits, metrics."""

import asyncio
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import userstyle
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving import lenet_serve, started_by

from lenet.errors import LenetError
from lenet.recognize import Recognizer
from lenet.server import ServeSettings, create_app
from lenet.server.app import Busy
from lenet.server.readers import PIPELINED_BYTES, ProcessReaders

LIMIT = 2_000_000  # below the default 5 MB, so that the 413 test sends less


@pytest.fixture(scope="module")
def test_digits(mnist):
    return mnist.test.images[:, 0].numpy(), mnist.test.labels.numpy()


@pytest.fixture(scope="module")
def client():
    """The service as `lenet serve` runs it: pictures read in two reading processes."""
    with TestClient(create_app(ServeSettings(max_upload_bytes=LIMIT))) as c:
        assert c.app.state.service.settings.reading == "processes"
        yield c


@pytest.fixture(scope="module")
def recognizer(client):
    """The CLI's recognizer on the backend the service chose."""
    return Recognizer.load(backend=client.get("/v1/models").json()["backend"])


def metric(client, name, **labels):
    """The value of one series in /metrics (0 when it has not been counted yet)."""
    text = client.get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if not labels and (plain := re.fullmatch(rf"{name} (\S+)", line)):
            return float(plain.group(1))
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_health_readiness_models_and_docs(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = client.get("/v1/models").json()
    # auto: onnxruntime where installed (the bundled models have ONNX exports), else torch.
    expected = "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    assert models["backend"] == expected
    assert {m["name"] for m in models["models"]} >= {"lenet", "lenet-relu"}
    assert models["loaded"] == ready.json()["model"] == models["serving"]["name"]
    bundled = {m["name"]: m["card"] for m in models["models"]}
    assert models["serving"]["card"] == bundled[models["loaded"]]
    assert all(m["card"]["parameters"] > 0 for m in models["models"])
    # Where the bundled models were built is nobody's business.
    assert all("out" not in m["card"]["config"] for m in models["models"])
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png"} <= set(body)
    assert {"PredictionOut", "ReadingOut", "ErrorOut"} <= set(spec["components"]["schemas"])
    # The documented answers are the ones given: text for /metrics, 503 from /readyz, 408
    # for a stalled upload, 501 from /v1/explain without PyTorch.
    paths = spec["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "503" in paths["/readyz"]["get"]["responses"]
    assert {"408", "413", "415", "422", "503"} <= set(paths["/v1/predict"]["post"]["responses"])
    assert "501" in paths["/v1/explain"]["post"]["responses"]
    # One docs page, offline: ReDoc's script fetches its logo from the internet.
    assert client.get("/redoc").status_code == 404


def test_every_kind_of_picture_gets_the_cli_answer(client, recognizer, test_digits):
    images, labels = test_digits
    rng = np.random.default_rng(11)
    kinds = {
        "paper-jpeg": lambda d: userstyle.paper(d, rng),
        "paper-png": lambda d: userstyle.paper(d, rng, "PNG"),
        "canvas": lambda d: userstyle.canvas(d, rng),
        "board": lambda d: userstyle.board(d, rng),
    }
    for k, (kind, make) in enumerate(kinds.items()):
        for i in range(3):
            index = 10 * k + i
            data = make(images[index])
            as_form = client.post("/v1/predict", files={"image": ("d.img", data)})
            raw = client.post(
                "/v1/predict", content=data, headers={"Content-Type": "application/octet-stream"}
            )
            assert as_form.status_code == raw.status_code == 200, (kind, as_form.text)
            # The same JSON as `lenet predict --json`, without "file".
            assert as_form.json() == raw.json() == recognizer.predict(data).to_dict()
            assert as_form.json()["digit"] == labels[index], kind


def test_read_a_number_and_the_input_the_model_saw(client, test_digits):
    images, labels = test_digits
    rng = np.random.default_rng(12)
    picks = [3, 5, 8, 13]
    data = userstyle.number_line([images[i] for i in picks], rng)
    answer = client.post(
        "/v1/read?include_input=true", content=data, headers={"Content-Type": "image/jpeg"}
    ).json()
    assert answer["text"] == "".join(str(labels[i]) for i in picks)
    assert [len(d["box"]) for d in answer["digits"]] == [4] * 4
    seen = Image.open(io.BytesIO(_data_url_bytes(answer["digits"][0]["input"])))
    assert seen.size == (28, 28)
    one = client.post("/v1/predict?include_input=true", files={"image": png(images[0])}).json()
    seen = np.asarray(Image.open(io.BytesIO(_data_url_bytes(one["input"]))))
    assert seen.shape == (28, 28) and seen.max() > 200


def _data_url_bytes(url):
    import base64

    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :])


def test_a_blank_canvas_is_no_digit(client):
    blank = np.zeros((280, 280, 4), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blank, "RGBA").save(buffer, "PNG")
    answer = client.post("/v1/predict", files={"image": buffer.getvalue()}).json()
    assert answer["digit"] is None and answer["reason"] == "no digit found"
    assert client.post("/v1/read", files={"image": buffer.getvalue()}).json() == {
        "text": None,
        "digits": [],
    }


def _chunks(data, size=8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


BAD = {
    # name: (request keyword arguments, status, reason counted, words in the message)
    "body over the limit": (
        {"content": b"\x89PNG" + b"\0" * LIMIT, "headers": {"Content-Type": "image/png"}},
        413,
        "too_large",
        "limit of 2,000,000 bytes",
    ),
    "streamed body over the limit (no length)": (
        {"content": _chunks(b"\0" * (LIMIT + 10)), "headers": {"Content-Type": "image/png"}},
        413,
        "too_large",
        "limit",
    ),
    "image bomb": (
        {"files": {"image": userstyle.png_claiming(100_000, 100_000)}},
        413,
        "too_many_pixels",
        "over the limit",
    ),
    "format outside the allow-list": (
        {"files": {"image": ("d.ppm", b"P5\n2 2\n255\n\0\0\0\0")}},
        415,
        "unsupported_format",
        "PPM",
    ),
    "text content type": (
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_format",
        "cannot carry a picture",
    ),
    "empty body": (
        {"content": b"", "headers": {"Content-Type": "image/png"}},
        422,
        "bad_request",
        "empty",
    ),
    "bare post: no body, no content type": ({}, 422, "bad_request", "no picture"),
    "truncated png": ({"files": {"image": "TRUNCATED"}}, 422, "undecodable", "truncated"),
    "text named png": (
        {"files": {"image": ("d.png", b"not a picture at all")}},
        422,
        "undecodable",
        "not an image",
    ),
    "form without the image field": (
        {"files": {"picture": b"x"}},
        422,
        "bad_request",
        "no field 'image'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_get_a_clear_json_error_and_are_counted(client, test_digits, case):
    kwargs, status, reason, words = BAD[case]
    if kwargs.get("files", {}).get("image") == "TRUNCATED":
        kwargs = {"files": {"image": ("d.png", png(test_digits[0][0])[:120])}}
    before = metric(client, "lenet_rejected_inputs_total", reason=reason)
    before_requests = metric(
        client, "lenet_http_requests_total", route="/v1/predict", method="POST", status=status
    )
    answer = client.post("/v1/predict", **kwargs)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["status"] == status and words in body["error"], body
    assert metric(client, "lenet_rejected_inputs_total", reason=reason) == before + 1
    after_requests = metric(
        client, "lenet_http_requests_total", route="/v1/predict", method="POST", status=status
    )
    assert after_requests == before_requests + 1
    # The service is still fine for the next one.
    good = client.post("/v1/predict", files={"image": png(test_digits[0][1])})
    assert good.status_code == 200 and good.json()["digit"] == test_digits[1][1]


def test_a_number_sent_to_predict_says_what_was_left_out(client, test_digits):
    images, labels = test_digits
    line = userstyle.number_line([images[i] for i in (0, 1, 2)], np.random.default_rng(8))
    answer = client.post("/v1/predict", content=line, headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200 and answer.json()["others"] == 2
    single = client.post("/v1/predict", files={"image": png(images[0])}).json()
    assert "others" not in single


def test_predictions_and_latency_are_counted(client, test_digits):
    images, labels = test_digits
    digit = int(labels[2])
    before = metric(client, "lenet_predictions_total", digit=digit)
    client.post("/v1/predict", files={"image": png(images[2])})
    assert metric(client, "lenet_predictions_total", digit=digit) == before + 1
    # A line's digits are counted one by one; one the model is unsure of as "unsure".
    unsure = metric(client, "lenet_predictions_total", digit="unsure")
    answer = client.post("/v1/read", files={"image": png(np.maximum(images[0], images[3]))})
    assert [d["digit"] for d in answer.json()["digits"]] == [None]
    assert metric(client, "lenet_predictions_total", digit="unsure") == unsure + 1
    count = metric(
        client,
        "lenet_http_request_duration_seconds_count",
        route="/v1/predict",
        method="POST",
        status=200,
    )
    assert count >= 1
    # Unknown paths are counted under one label, not one series per path.
    unmatched = metric(
        client, "lenet_http_requests_total", route="unmatched", method="GET", status=404
    )
    client.get("/no/such/page")
    assert "/no/such/page" not in client.get("/metrics").text
    assert client.get("/no/such/page").json()["status"] == 404
    # Routes of Starlette's own (the OpenAPI document, static files) by their templates too,
    # not with the unknown paths.
    for path, route in [
        ("/openapi.json", "/openapi.json"),
        ("/static/app.js", "/static/{path}"),
        ("/static/style.css", "/static/{path}"),
    ]:
        before = metric(client, "lenet_http_requests_total", route=route, method="GET", status=200)
        assert client.get(path).status_code == 200
        after = metric(client, "lenet_http_requests_total", route=route, method="GET", status=200)
        assert after == before + 1, path
    counted = metric(
        client, "lenet_http_requests_total", route="unmatched", method="GET", status=404
    )
    assert counted == unmatched + 2


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=600), cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_no_upload_ever_gives_a_server_error(client, data, cut, flip):
    # Random bytes, and real PNGs and JPEGs cut short or with a byte changed.
    picture = np.zeros((40, 40), np.uint8)
    picture[10:30, 18:22] = 255
    for sample in (data, png(picture)[:cut], _flipped(png(picture), flip), _jpeg(picture, flip)):
        answer = client.post("/v1/predict", content=sample, headers={"Content-Type": "image/png"})
        assert answer.status_code in (200, 413, 415, 422), answer.text
        assert "error" in answer.json() or "digit" in answer.json()


def _flipped(data, at):
    if not data:
        return data
    at %= len(data)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _jpeg(picture, at):
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "JPEG")
    return _flipped(buffer.getvalue(), at)


def test_a_slow_answer_is_503_and_the_service_recovers(test_digits):
    app = create_app(ServeSettings(timeout_s=0.3, reading="threads"))
    with TestClient(app) as c:
        recognizer = app.state.service.recognizer
        original = recognizer.predict

        def slow(image):
            time.sleep(1.0)
            return original(image)

        recognizer.predict = slow
        answer = c.post("/v1/predict", files={"image": png(test_digits[0][0])})
        assert answer.status_code == 503 and "retry" in answer.json()["error"]
        assert answer.headers["Retry-After"] == "1"
        assert metric(c, "lenet_rejected_inputs_total", reason="busy") == 1
        recognizer.predict = original
        time.sleep(1.0)  # the slow one finishes in its thread
        good = c.post("/v1/predict", files={"image": png(test_digits[0][0])})
        assert good.status_code == 200


def test_waiting_work_is_bounded():
    """Beyond max_pending waiting requests, the next is refused at once instead of queued."""
    app = create_app(ServeSettings(readers=1, max_pending=2, timeout_s=5, reading="threads"))
    service = app.state.service
    release = threading.Event()

    class Stub:
        name = "stub"

    service.recognizer = Stub()

    def later(value):
        return lambda deadline: service.pool.submit(value)

    async def scenario():
        blocked = [asyncio.ensure_future(service.run(later(lambda: release.wait(5)))) for _ in "ab"]
        await asyncio.sleep(0.1)
        with pytest.raises(Busy, match="2 requests are already waiting"):
            await service.run(later(lambda: "too many"))
        release.set()
        assert await asyncio.gather(*blocked) == [True, True]
        assert await service.run(later(lambda: "served")) == "served"
        assert service.pending == 0

    asyncio.run(scenario())
    service.close()


def test_explain_shows_what_the_network_sees(client, test_digits):
    images, labels = test_digits
    answer = client.post("/v1/explain", files={"image": png(images[4])})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    predicted = client.post("/v1/predict", files={"image": png(images[4])}).json()
    assert result["digit"] == predicted["digit"] == labels[4]
    assert Image.open(io.BytesIO(_b64(result["input"]["png"]))).size == (28, 28)
    # Convolution and pooling maps in forward order, one PNG per channel.
    assert [layer["kind"] for layer in result["layers"]][:2] == ["convolution", "pooling"]
    for layer in result["layers"]:
        assert len(layer["png"]) == layer["shape"][0]
        h, w = layer["shape"][1:]
        assert Image.open(io.BytesIO(_b64(layer["png"][0]))).size == (w, h)
    blank = client.post("/v1/explain", files={"image": png(np.zeros((50, 50), np.uint8))})
    assert blank.status_code == 422 and "no digit found" in blank.json()["error"]


def _b64(text):
    import base64

    return base64.b64decode(text)


def test_the_onnx_backend_serves_the_same_answers(test_digits):
    pytest.importorskip("onnxruntime")
    images, labels = test_digits
    rng = np.random.default_rng(21)
    with (
        TestClient(create_app(ServeSettings(backend="onnx", reading="threads"))) as onnx,
        TestClient(create_app(ServeSettings(backend="torch"))) as torch_backend,
    ):
        assert onnx.get("/v1/models").json()["backend"] == "onnx"
        assert torch_backend.get("/v1/models").json()["backend"] == "torch"
        for i in range(5):
            data = userstyle.canvas(images[40 + i], rng)
            a = onnx.post("/v1/predict", files={"image": data}).json()
            b = torch_backend.post("/v1/predict", files={"image": data}).json()
            assert a["digit"] == b["digit"] == labels[40 + i]
            assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-4)


def test_damaged_uploads_are_answered_without_library_noise_in_the_log(test_digits, tmp_path):
    import urllib.error
    import urllib.request

    # A form whose boundary is wrong (python-multipart logged a warning before raising) and a
    # TIFF with damaged metadata (Pillow warned from the reading process).
    good = io.BytesIO()
    Image.fromarray(test_digits[0][0]).save(good, "TIFF")
    tiff = bytearray(good.getvalue())
    first = int.from_bytes(tiff[4:8], "little") + 2  # the first tag (ImageWidth) of the IFD
    tiff[first + 4 : first + 8] = (1000).to_bytes(4, "little")  # 1,000 values, past the end
    form = b"--wrong\r\nContent-Disposition: form-data; name=image\r\n\r\nxx\r\n--wrong--\r\n"
    log = tmp_path / "serve.log"
    with lenet_serve(log=log) as base:
        for body, kind in [
            (form, "multipart/form-data; boundary=xyz"),
            (bytes(tiff), "image/tiff"),
        ]:
            request = urllib.request.Request(f"{base}/v1/predict", body, {"Content-Type": kind})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code in (415, 422), kind
    said = log.read_text()
    assert "lenet serve: model" in said  # the log was written
    assert "Expected boundary" not in said and "Warning" not in said, said


def test_serve_cli_with_two_workers_counts_all_of_them(test_digits):
    import urllib.request

    with lenet_serve("--workers", "2") as base:
        body = png(test_digits[0][0])
        for _ in range(6):
            request = urllib.request.Request(
                f"{base}/v1/predict", body, {"Content-Type": "image/png"}
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert json_load(answer)["digit"] == test_digits[1][0]
        # Either worker answers the scrape, and it counts the requests of both. A request
        # is counted once its answer is sent, so the last one may show a moment later.
        line = 'lenet_http_requests_total{method="POST",route="/v1/predict",status="200"} 6.0'
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
                text = answer.read().decode()
            if line in text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert line in text


def json_load(answer):
    import json

    return json.loads(answer.read())


def _serve_at_once(*options):
    """`lenet serve OPTIONS` run to its end: for options it must refuse before serving."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "lenet", "serve", *options],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_cli_reports_a_wrong_model_before_serving():
    done = _serve_at_once("--weights", "alexnet", "--port", "1")
    assert done.returncode == 2 and "alexnet is neither" in done.stderr


def post_form_part(client, disposition: bytes, data: bytes):
    """POST /v1/predict a multipart form of one part, written by hand: ``disposition`` is the
    rest of its Content-Disposition line (and any headers after it), ``data`` its bytes."""
    body = (
        b"--xyz\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n"
        + data + b"\r\n--xyz--\r\n"
    )  # fmt: skip
    return client.post(
        "/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )


def test_a_part_sent_without_a_filename_keeps_its_bytes(client, test_digits):
    # curl -F 'image=<digit.png' sends the file as a plain form field; Starlette decodes such
    # parts as text, which once turned a valid PNG or BMP into a 422 "damaged".
    images, labels = test_digits
    for fmt in ("PNG", "BMP"):
        buffer = io.BytesIO()
        Image.fromarray(images[7]).save(buffer, fmt)
        headers = b'name="image"\r\nContent-Type: image/' + fmt.lower().encode()
        answer = post_form_part(client, headers, buffer.getvalue())
        assert answer.status_code == 200, (fmt, answer.text)
        assert answer.json()["digit"] == labels[7]


def test_a_part_without_a_filename_is_read_as_sent_even_when_it_is_valid_utf8(client, test_digits):
    # Such a part's bytes were recovered from Starlette's text of them, which cannot tell
    # Latin-1 from UTF-8 when the bytes are valid UTF-8 and its characters all below 256.
    images, labels = test_digits
    # A 24-bit BMP (bytes blue, green, red) whose ink pixels are 20 C3 A9: a space and "é".
    ink = images[3] > 60
    pixels = np.full((28, 28, 3), 0x20, np.uint8)
    pixels[ink] = (0xA9, 0xC3, 0x20)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "BMP", dpi=(72, 72))  # 96 dpi writes a C4 byte
    raw = buffer.getvalue()
    assert "é" in raw.decode("utf-8")  # the case that was lost
    for disposition in (b'name="image"', b'name="image"; filename="d.bmp"'):
        answer = post_form_part(client, disposition, raw)
        assert answer.status_code == 200, (disposition, answer.text)
        assert answer.json()["digit"] == labels[3]


def _raw_request(base, request, read=True):
    """Send bytes on a fresh connection to the server at ``base``; its answer, if ``read``."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(base)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(request)
        if not read:
            return b""
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_hang_ups_stalls_head_and_wrong_methods_on_a_real_server(test_digits):
    import urllib.request

    png_bytes = png(test_digits[0][0])
    with lenet_serve("--timeout", "1.5") as base:
        # A client that hangs up part-way through its upload: no 5xx, no traceback.
        head = (
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\nConnection: close\r\n\r\n"
        )
        for _ in range(3):
            _raw_request(base, head + png_bytes[:4], read=False)
        # A client that stalls part-way: 408 once nothing has come for --timeout seconds.
        started = time.monotonic()
        stalled = _raw_request(base, head + png_bytes[:4] + b"")
        assert stalled.startswith(b"HTTP/1.1 408") and b"stalled" in stalled
        assert time.monotonic() - started < 10
        # HEAD wherever GET answers; a wrong method says which ones are allowed.
        for path in ("/", "/healthz", "/readyz", "/metrics", "/v1/models"):
            head_request = f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            answer = _raw_request(base, head_request.encode())
            assert answer.startswith(b"HTTP/1.1 200"), (path, answer[:100])
        wrong = _raw_request(
            base, b"DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert wrong.startswith(b"HTTP/1.1 405") and re.search(rb"(?i)\r\nallow: .*GET", wrong)
        time.sleep(0.5)  # the hang-ups are answered (to nobody) asynchronously
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        server_errors = re.findall(
            r'lenet_http_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)', text
        )
        assert all(float(v) == 0 for v in server_errors), server_errors
        assert re.search(r'lenet_rejected_inputs_total\{reason="client_disconnected"\} 3', text)
        assert re.search(r'lenet_rejected_inputs_total\{reason="upload_stalled"\} 1', text)


def test_serve_announces_the_port_it_bound_and_only_once_bound():
    import subprocess
    import sys
    import urllib.request

    from serving import free_port

    process = subprocess.Popen(
        [sys.executable, "-m", "lenet", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The ready line, among whatever else start-up prints, within a minute.
        found = []
        reader = threading.Thread(
            target=lambda: found.extend(
                m
                for line in process.stdout
                if (m := re.search(r"http://127\.0\.0\.1:(\d+)/", line))
            ),
            daemon=True,
        )
        reader.start()
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:
            time.sleep(0.1)
        assert found, "no ready line within 60 s"
        port = int(found[0].group(1))
        assert port != 0, found[0].group(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
            assert answer.status == 200
    finally:
        process.terminate()
        process.wait(20)
    # A port already taken: said before serving, with what to do, and no "ready" line.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "lenet", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2 and "ready" not in done.stdout, done.stdout
    assert f"Port {port} on 127.0.0.1 is in use" in done.stderr and "--port 0" in done.stderr
    bad = _serve_at_once("--timeout", "nan")
    assert bad.returncode == 2 and "--timeout must be a positive number" in bad.stderr
    both = _serve_at_once("--port", "0", "--workers", "2")
    assert both.returncode == 2 and "--port 0" in both.stderr


def test_explain_uses_the_weights_an_onnx_model_was_exported_from(tmp_path, test_digits):
    pytest.importorskip("onnxruntime")
    import torch

    from lenet.export import export
    from lenet.weights import load_weights, save_weights

    # Weights of one's own: the bundled lenet-relu's with its outputs rotated by one (it
    # reads a 4 as 5), the same architecture as the bundled model but other answers.
    loaded = load_weights("lenet-relu")
    output = loaded.model.classifier[-1]
    with torch.no_grad():
        output.weight.copy_(output.weight.roll(1, 0))
        output.bias.copy_(output.bias.roll(1, 0))
    weights = save_weights(tmp_path / "mine.safetensors", loaded.model, loaded.card)
    onnx = tmp_path / "mine.onnx"
    export(weights, onnx, "onnx", check=False)
    data = png(test_digits[0][4])
    # Read in processes: they load the user's file too, not the bundled model.
    settings = ServeSettings(weights=str(onnx), backend="onnx")
    with TestClient(create_app(settings)) as serving:
        predicted = serving.post("/v1/predict", files={"image": data}).json()
        explained = serving.post("/v1/explain", files={"image": data}).json()
    assert explained["digit"] == predicted["digit"]
    assert np.allclose(explained["probabilities"], predicted["probabilities"], atol=1e-3)
    bundled = Recognizer.load("lenet-relu", backend="onnx").predict(data)
    assert predicted["digit"] == (bundled.digit + 1) % 10
    # Without those weights, explaining is refused rather than done with another model's.
    weights.unlink()
    with TestClient(create_app(replace(settings, reading="threads"))) as serving:
        refused = serving.post("/v1/explain", files={"image": data})
    assert refused.status_code == 501 and "mine.safetensors" in refused.json()["error"]


ALLOCATION_PROBE = """
import io, resource, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image
from lenet.preprocess import preprocess
from lenet.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
rng = np.random.default_rng(0)
canvas = np.zeros((280, 280, 4), np.uint8)
canvas[60:220, 120:160, 3] = 255  # a drawn 1, as the page sends it
buffer = io.BytesIO()
Image.fromarray(canvas, "RGBA").save(buffer, "PNG")
data = buffer.getvalue()
pool = ThreadPoolExecutor(2)  # two requests at once, as the server's pool runs them
def pictures(n):
    for _ in range(n // 2):
        for future in [pool.submit(preprocess, data) for _ in range(2)]:
            future.result()
pictures(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pictures(100)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


GLIBC = bool(getattr(os, "confstr", lambda _: None)("CS_GNU_LIBC_VERSION"))


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_the_server_keeps_freed_memory_instead_of_faulting_it_back(monkeypatch):
    """Reading pictures in two threads made glibc return and re-fault ~550 pages a picture;
    `lenet serve` keeps freed blocks (lenet.allocator)."""

    def faults(mode):
        run = subprocess.run(
            [sys.executable, "-c", ALLOCATION_PROBE, mode], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return float(run.stdout)

    default, kept = faults("default"), faults("keep")
    assert kept < 5, (default, kept)
    # The probe is sensitive: without the setting it faults pages back on every picture.
    assert default > 50, (default, kept)

    # And `lenet serve` turns it on (uvicorn's serving loop replaced by a no-op).
    import lenet.server.runner as runner

    calls = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(runner._AnnouncingServer, "run", lambda self: None)
    runner.run(ServeSettings(), Recognizer.load(backend="torch"), 1, False)
    assert calls == [True]


FULL_COLLECTION_PROBE = """
import gc, sys, time
from fastapi.testclient import TestClient
from lenet.server import ServeSettings, create_app
with TestClient(create_app(ServeSettings(reading="threads"))) as client:
    assert client.get("/readyz").status_code == 200
    frozen = gc.get_freeze_count()
    started = time.perf_counter()
    gc.collect()
    print(frozen, time.perf_counter() - started)
"""


def test_a_ready_server_leaves_what_it_loaded_out_of_full_collections():
    """A full garbage collection walked the ~80,000 objects start-up loads (45-68 ms, every
    request in flight held up); once ready, the server has frozen them (gc.freeze)."""
    run = subprocess.run(
        [sys.executable, "-c", FULL_COLLECTION_PROBE], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    frozen, seconds = run.stdout.split()
    assert int(frozen) > 50_000  # the imported libraries and the model, not a handful
    assert float(seconds) < 0.01, seconds  # about 50 ms without the freeze


def _alive(pid):
    """Running: not gone, and not a zombie waiting for a parent to collect it (an orphan's
    parent, PID 1 in a container, may never do so)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_reading_processes_skip_late_work_and_stop_with_the_service(test_digits):
    data = png(test_digits[0][3])
    app = create_app(ServeSettings(readers=1))
    with TestClient(app) as c:
        readers = app.state.service.readers
        (pid,) = readers.pids()
        assert pid != os.getpid() and _alive(pid)

        async def late_and_fresh():
            # Work whose client was answered 503 already is dropped, never read.
            late = await readers.submit("predict", data, False, time.monotonic() - 1)
            fresh = await readers.submit("read", data, True, time.monotonic() + 10)
            return late, fresh

        late, (fresh, counted) = c.portal.call(late_and_fresh)
        assert late is None
        assert fresh["text"] == str(test_digits[1][3]) and fresh["digits"][0]["input"]
        assert counted == [(test_digits[1][3], None)]

        slow = _slow_small_png(test_digits[0][7])
        big = _large_digit_png(test_digits[0][7])
        assert len(slow) <= PIPELINED_BYTES < len(big)

        async def pipelined():
            later = time.monotonic() + 30
            (reader,) = readers.readers
            # A small picture goes into the pipe at once, to be read right after the one
            # being read; this one's time runs out before then, so the reader skips it.
            first = readers.submit("predict", slow, False, later)
            expired = readers.submit("predict", data, False, time.monotonic() + 0.03)
            assert len(reader.jobs) == 2
            answers = await asyncio.gather(first, expired)
            # A large picture waits until the reader is free: sending it could block.
            small = readers.submit("predict", slow, False, later)
            large = readers.submit("predict", big, False, later)
            assert len(reader.jobs) == 1 and len(readers.waiting) == 1
            answers += [await small]
            # And a small one is not put behind a large one, where it would wait longest.
            behind = readers.submit("predict", data, False, later)
            assert len(reader.jobs) == 1 and len(readers.waiting) == 1
            return answers + list(await asyncio.gather(large, behind))

        first, expired, small, large, behind = c.portal.call(pipelined)
        assert expired is None
        assert first[0]["digit"] == small[0]["digit"] == large[0]["digit"] == test_digits[1][7]
        assert behind[0]["digit"] == test_digits[1][3]
        assert app.state.service.pending == 0

        # In the same way, a request past its time limit in a reading process is 503.
        app.state.service.settings = replace(app.state.service.settings, timeout_s=0.02)
        assert c.post("/v1/predict", files={"image": big}).status_code == 503
        time.sleep(0.5)
        assert app.state.service.pending == 0
    assert not _alive(pid)


def _large_digit_png(digit, side=4000):
    """A digit drawn large and smooth: a large file that takes a reader a while to read."""
    return png(np.asarray(Image.fromarray(digit).resize((side, side))))


def _slow_small_png(digit, side=4500):
    """A digit drawn large in flat blocks: a small file that takes a reader a while."""
    return png(np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.NEAREST)))


def test_a_reading_process_that_dies_is_replaced(client, test_digits):
    """Killed (out of memory, by hand): the picture it was reading is answered 503, never
    500; every other request is answered; a new process takes its place."""
    data = png(test_digits[0][5])
    readers = client.app.state.service.readers
    before = readers.pids()
    assert metric(client, "lenet_reading_processes") == 2
    restarts = metric(client, "lenet_reading_process_restarts_total")
    # Killed while idle: once that is seen (at once: its pipe closes), the other reader
    # answers everything while a new one starts.
    os.kill(before[0], 9)
    time.sleep(0.5)
    assert before[0] not in readers.pids()
    for _ in range(20):
        answer = client.post("/v1/predict", files={"image": data})
        assert answer.status_code == 200 and answer.json()["digit"] == test_digits[1][5]

    # Killed while reading a picture: that one request is answered 503.
    big = _large_digit_png(test_digits[0][6])

    async def kill_while_reading():
        answer = readers.submit("predict", big, False, time.monotonic() + 30)
        (reading,) = [r for r in readers.readers if r.jobs]
        os.kill(reading.process.pid, 9)
        with pytest.raises(Busy, match="stopped while reading"):
            await answer
        return reading.process.pid

    killed = client.portal.call(kill_while_reading)
    deadline = time.monotonic() + 60
    while len(readers.serving) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = readers.pids()
    assert len(after) == 2 and before[0] not in after and killed not in after
    assert not _alive(before[0]) and not _alive(killed)
    assert client.get("/readyz").status_code == 200
    answer = client.post("/v1/predict", files={"image": data})
    assert answer.status_code == 200 and answer.json()["digit"] == test_digits[1][5]
    # Operators see it in /metrics.
    assert metric(client, "lenet_reading_process_restarts_total") == restarts + 2
    assert metric(client, "lenet_reading_processes") == 2


def test_reading_processes_that_cannot_load_the_model_say_why():
    async def scenario():
        readers = ProcessReaders("no-such-model", "auto", 1000, 1)
        problem = await readers.start()
        assert problem is not None and "could not load the model" in problem
        assert "no-such-model" in problem
        with pytest.raises(Busy, match="not running"):
            readers.submit("predict", b"", False, time.monotonic() + 1)
        assert readers.pids() == []
        readers.close()

    asyncio.run(scenario())


def test_a_reader_that_cannot_be_replaced_says_why_and_is_retried(tmp_path, test_digits):
    """The model file removed, then a reader killed: the new one cannot load it; waiting
    pictures are answered at once, the readers say why they are down, and keep trying."""
    import shutil

    import lenet

    model = tmp_path / "mine.onnx"
    shutil.copy(os.path.join(os.path.dirname(lenet.__file__), "pretrained", "lenet-relu.onnx"),
                model)  # fmt: skip
    data = png(test_digits[0][2])

    async def scenario():
        readers = ProcessReaders(str(model), "onnx", 40_000_000, 1)
        assert await readers.start() is None
        # Killed with a picture in the pipe behind the one it reads: that one is lost (503),
        # the next is read by the reader started in its place.
        later = time.monotonic() + 60
        reading = readers.submit("predict", _slow_small_png(test_digits[0][7]), False, later)
        queued = readers.submit("predict", data, False, later)
        os.kill(readers.pids()[0], 9)
        with pytest.raises(Busy, match="stopped while reading"):
            await reading
        answer, _ = await asyncio.wait_for(queued, 60)
        assert answer["digit"] == test_digits[1][2]
        model.unlink()
        (pid,) = readers.pids()
        os.kill(pid, 9)
        # Seen at once (its pipe closes); the picture is sent while the new reader starts,
        # which takes far longer than this wait on any machine.
        while readers.serving:
            await asyncio.sleep(0.01)
        waiting = readers.submit("predict", data, False, time.monotonic() + 100)
        started = time.monotonic()
        with pytest.raises(Busy, match="could not load the model"):
            await waiting
        assert time.monotonic() - started < 60  # answered once the new reader failed
        assert "mine.onnx" in readers.problem() and "retrying" in readers.problem()
        with pytest.raises(Busy, match="not running"):
            readers.submit("predict", data, False, time.monotonic() + 10)
        # Retried after a pause that grows: the model put back, reading resumes.
        shutil.copy(os.path.join(os.path.dirname(lenet.__file__), "pretrained",
                                 "lenet-relu.onnx"), model)  # fmt: skip
        deadline = time.monotonic() + 60
        while readers.problem() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert readers.problem() is None
        answer, _ = await readers.submit("predict", data, False, time.monotonic() + 10)
        assert answer["digit"] == test_digits[1][2]
        readers.close()
        assert readers.pids() == []

    asyncio.run(scenario())


def test_default_readers_follow_the_cpu_quota(tmp_path):
    from lenet.server.app import default_readers, usable_cores

    cores = usable_cores(str(tmp_path / "none"))  # no cgroup v2 file: affinity alone
    assert cores >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")  # docker --cpus 0.5
    assert usable_cores(str(quota)) == 1
    quota.write_text("150000 100000\n")  # docker --cpus 1.5: two cores, partly
    assert usable_cores(str(quota)) == min(cores, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(str(quota)) == cores
    assert default_readers(1) <= 4 and default_readers(10**6) == 1


def test_serve_settings_are_checked():
    with pytest.raises(LenetError, match="processes, threads"):
        ServeSettings(reading="fork")
    with pytest.raises(LenetError, match="at least 1"):
        ServeSettings(readers=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reading_processes_end_when_the_server_is_killed():
    """Even SIGKILLed, the server leaves no reading process behind holding its pipes."""
    with lenet_serve("--readers", "2") as base:
        port = base.rsplit(":", 1)[1]
        (server,) = [
            pid
            for pid in started_by(os.getpid())
            if f"--port\0{port}\0" in open(f"/proc/{pid}/cmdline").read()
        ]
        started = started_by(server)  # the two readers and multiprocessing's tracker
        assert len(started) >= 2
        os.kill(server, 9)
        deadline = time.monotonic() + 20
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in started if _alive(pid)]


def test_models_shows_the_card_of_weights_given_to_serve(tmp_path):
    # `lenet serve --weights RUN`: the architecture's name alone would read as the bundled
    # model's; the card says which weights answer.
    import shutil

    from lenet.weights import bundled_weights, card_path, read_card

    mine = tmp_path / "mine.safetensors"
    shutil.copy(bundled_weights()["lenet"], mine)
    card = read_card(bundled_weights()["lenet"]) | {"created": "by this test"}
    card_path(mine).write_text(json.dumps(card))
    served = ServeSettings(weights=str(mine), backend="torch", reading="threads", readers=1)
    with TestClient(create_app(served)) as client:
        models = client.get("/v1/models").json()
    assert models["loaded"] == "lenet" and models["serving"]["card"]["created"] == "by this test"
    assert all(m["card"]["created"] != "by this test" for m in models["models"])
