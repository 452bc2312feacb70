"""Classify examples/*.jpg through the Open Inference Protocol with tritonclient (pip install "tritonclient[http]").

    python examples/triton_client.py            # against prune-serve on 127.0.0.1:8000
"""

from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient(url="127.0.0.1:8000")
files = sorted(Path(__file__).parent.glob("*.jpg"))

# Encoded image files as a BYTES tensor (sent as binary data, tritonclient's default for BYTES here).
images = httpclient.InferInput("IMAGE_BYTES", [len(files)], "BYTES")
images.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=np.object_))
top2 = httpclient.InferRequestedOutput("probabilities", class_count=2)  # the classification extension

# Model "auto" lets the server choose: here the fastest variant losing at most 1 point.
result = client.infer("auto", [images], outputs=[top2], parameters={"max_drop": 1.0})
print("variant:", result.get_response()["parameters"]["variant"])
for path, row in zip(files, result.as_numpy("probabilities")):
    print(f"{path.name:>14}: " + ", ".join(item.decode() for item in row))  # "score:index:label"
