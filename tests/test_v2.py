"""The Open Inference Protocol door, driven by tritonclient (JSON and binary), plus its bad inputs."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import CLASSES, jpeg_bytes
from tests.live import LiveServer

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def client(live_server: LiveServer):
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{live_server.port}")
    yield c
    c.close()


def pixels(count: int) -> tuple[np.ndarray, list[bytes]]:
    """``count`` JPEGs and their decoded 32×32 RGB pixels (what the server would decode them to)."""
    files = [jpeg_bytes(((40 * i) % 255, 200 - 10 * i, 90)) for i in range(count)]
    arrays = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
    return np.stack(arrays).astype(np.uint8), files


def test_health_metadata_and_readiness(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert set(client.get_server_metadata()["extensions"]) >= {"binary_tensor_data", "classification"}
    meta = client.get_model_metadata("gate-keep0.50")
    assert meta["versions"] == ["1"] and meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32",
                                                               "shape": [-1, len(CLASSES)]}
    assert {i["name"] for i in meta["inputs"]} == {"IMAGE", "IMAGE_BYTES"}
    assert client.is_model_ready("dense") and client.is_model_ready("auto") and client.is_model_ready("dense", "1")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [False, True])
def test_uint8_pixels_json_and_binary_equal_predict(client, live_server: LiveServer, binary: bool) -> None:
    images, files = pixels(3)
    tensor = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    result = client.infer("gate-keep0.50", [tensor],
                          outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    rest = httpx.post(f"{live_server.url}/predict?keep=0.5&top_k={len(CLASSES)}",
                      files=[("files", (f"{i}.jpg", f)) for i, f in enumerate(files)]).json()
    for row, prediction in zip(probs, rest["predictions"]):
        expected = {t["index"]: t["probability"] for t in prediction["top_k"]}
        assert np.allclose([row[i] for i in sorted(expected)], [expected[i] for i in sorted(expected)], atol=1e-5)


def test_encoded_images_as_bytes_with_classification(client) -> None:
    _, files = pixels(2)
    tensor = httpclient.InferInput("IMAGE_BYTES", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    result = client.infer("dense", [tensor], outputs=[httpclient.InferRequestedOutput("probabilities",
                                                                                      class_count=2)])
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    score, index, label = top[0][0].decode().split(":")
    assert 0 <= float(score) <= 1 and CLASSES[int(index)] == label


def test_auto_model_chooses_from_parameters(client) -> None:
    images, _ = pixels(1)
    tensor = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    chosen = client.infer("auto", [tensor], parameters={"max_drop": 0.0}).get_response()["parameters"]
    assert chosen["variant"] == "dense"
    chosen = client.infer("auto", [tensor], parameters={"keep": 0.5, "granularity": "channel"})
    assert chosen.get_response()["parameters"]["variant"] == "channel-keep0.50"


def test_the_tta_parameter_chooses_the_level_like_predicts_query(client, live_server: LiveServer) -> None:
    images, files = pixels(2)
    tensor = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    for level in (0, 1, 2):
        result = client.infer("dense", [tensor], parameters={"tta": level})
        assert result.get_response()["parameters"]["tta"] == level
        rest = httpx.post(f"{live_server.url}/predict?keep=1&tta={level}&top_k={len(CLASSES)}",
                          files=[("files", (f"{i}.jpg", f)) for i, f in enumerate(files)]).json()
        assert rest["tta"] == level
        for row, prediction in zip(result.as_numpy("probabilities"), rest["predictions"]):
            assert np.allclose([row[t["index"]] for t in prediction["top_k"]],
                               [t["probability"] for t in prediction["top_k"]], atol=1e-5)
    for bad in (3, -1, "1", True, 0.5):
        with pytest.raises(InferenceServerException, match="parameter tta must be one of 0, 1, 2"):
            client.infer("dense", [tensor], parameters={"tta": bad})
    # auto at a fixed level needs figures there: the test manifest records accuracy at its served level 0 only
    with pytest.raises(InferenceServerException, match="TTA level 2"):
        client.infer("auto", [tensor], parameters={"max_drop": 1.0, "tta": 2})
    chosen = client.infer("auto", [tensor], parameters={"keep": 0.5, "tta": 2}).get_response()["parameters"]
    assert chosen["variant"] == "gate-keep0.50" and chosen["tta"] == 2  # a named keep may take any level


def test_errors_are_4xx_with_an_error_body(client, live_server: LiveServer) -> None:
    images, _ = pixels(1)
    tensor = httpclient.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(InferenceServerException, match=r"shape \[N, 32, 32, 3\]"):
        client.infer("dense", [tensor])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")
    url = f"{live_server.url}/v2/models/dense/infer"
    cases = [
        (b"{not json", {}, 400, "not valid JSON"),
        (json.dumps({"inputs": []}).encode(), {}, 400, "no inputs"),
        (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 32, 32, 3],
                                 "data": [0] * 3072}]}).encode(), {}, 400, "must be UINT8"),
        (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                 "data": [300] * 3072}]}).encode(), {}, 400, "0..255"),
        (json.dumps({"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1],
                                 "data": ["abc"]}]}).encode(), {}, 400, "binary data"),
        (json.dumps({"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [1]}]}).encode(),
         {}, 400, "unknown input"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, 400, "the body has 2 bytes"),
    ]
    short = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                    "parameters": {"binary_data_size": 3072}}]}).encode()
    cases.append((short + b"\0" * 10, {"Inference-Header-Content-Length": str(len(short))}, 400, "does not fit"))
    head = json.dumps({"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 12}}]}).encode()
    cases.append((head + struct.pack("<I", 8) + b"notimage", {"Inference-Header-Content-Length": str(len(head))},
                  415, "not an image"))
    for body, headers, status, message in cases:
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == status and message in r.json()["error"], (r.status_code, r.text, message)
    r = httpx.post(f"{live_server.url}/v2/models/dense/versions/7/infer", content=b"{}")
    assert r.status_code == 404 and "version" in r.json()["error"]
    assert httpx.get(f"{live_server.url}/health").status_code == 200  # still serving


def test_metrics_count_v2_requests_like_predict(client, live_server: LiveServer) -> None:
    images, _ = pixels(2)
    tensor = httpclient.InferInput("IMAGE", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=True)
    before = _images_counted(live_server, "gate-keep0.10")
    client.infer("gate-keep0.10", [tensor])
    assert _images_counted(live_server, "gate-keep0.10") == before + 2


def _images_counted(live_server: LiveServer, variant: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{live_server.url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "prune_images"
               for s in f.samples if s.name == "prune_images_total" and s.labels["variant"] == variant)


def test_rest_example_with_curl_shape(live_server: LiveServer, tmp_path: Path) -> None:
    """The README's JSON example: UINT8 pixels inline, classification asked."""
    body = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [128] * 3072}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    r = httpx.post(f"{live_server.url}/v2/models/dense/infer", json=body)
    assert r.status_code == 200
    out = r.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2] and len(out["data"]) == 2
