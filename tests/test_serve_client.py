"""A tritonclient caller of `echo-serve`, run by tests/test_serve.py inside the serve environment
(.venv/serve, where tritonclient comes with nvidia-pytriton); it holds no tests itself.

    python tests/test_serve_client.py HTTP_URL GRPC_URL IMAGE [IMAGE ...]

prints one JSON object: {"http": [one unary `echo` answer per image, over HTTP with binary
tensor data], "stream": [the `echo_stream` responses of each image, over gRPC streaming],
"bad_stream": the stream error for bytes that are no image}.
"""
from __future__ import annotations

import json
import queue
import sys


def _answer(result, names) -> dict:
    out = {}
    for n in names:
        a = result.as_numpy(n)
        if a is None:
            continue
        v = a.reshape(-1).tolist() if n == "tokens" else a.reshape(-1)[0]
        out[n] = v.decode("utf-8", "replace") if isinstance(v, bytes) else (v if isinstance(v, list) else int(v))
    return out


def http_unary(url: str, path: str) -> dict:
    import numpy as np
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url)
    image = httpclient.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[open(path, "rb").read()]], dtype=object), binary_data=True)
    name = httpclient.InferInput("name", [1, 1], "BYTES")
    name.set_data_from_numpy(np.array([[path.encode()]], dtype=object))
    r = c.infer("echo", [image, name])
    return _answer(r, ["text", "tokens", "forward_passes", "stop", "error", "batch_items", "graph_batch", "instance"])


def grpc_stream(url: str, data: bytes) -> dict:
    import numpy as np
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=object))
    c.async_stream_infer("echo_stream", [image], enable_empty_final_response=True)
    events, error = [], None
    while True:
        result, err = got.get(timeout=120)
        if err is not None:
            error = str(err)
            break
        resp = result.get_response()
        if resp.parameters.get("triton_final_response") and resp.parameters["triton_final_response"].bool_param \
                and not resp.outputs:
            break  # the empty closing response: every response before it was counted
        events.append(_answer(result, ["text", "tokens", "block", "final", "forward_passes", "stop"]))
    c.stop_stream()
    c.close()
    return {"events": events, "error": error}


def main(argv: list[str]) -> None:
    http_url, grpc_url, *images = argv
    out = {"http": [http_unary(http_url, p) for p in images],
           "stream": [grpc_stream(grpc_url, open(p, "rb").read()) for p in images],
           "bad_stream": grpc_stream(grpc_url, b"this is not an image")}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
