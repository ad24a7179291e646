"""The two Triton models of `echo-serve`, bound through PyTriton to an EnginePool.

echo         unary, dynamic batching: Triton gathers concurrent requests into batches of up to
             the engine's largest built batch size (its built sizes preferred); the pool decodes a
             batch at a built size, padded or split. Per image: text, tokens (-1 pads a request
             of several images), forward_passes, stop, error ("" when fine: one bad image does not
             fail the requests batched with it), timings (JSON), document (the report in the
             asked `format`), and how it was batched: batch_items (images decoded together),
             graph_batch (the engine batch size) and instance. A request whose image cannot be
             used (corrupt bytes, not an image, an unknown format) fails alone with HTTP 400 / gRPC
             INVALID_ARGUMENT carrying the runtime's message; its batch-mates are answered as usual
             (PyTriton 0.7 fails whole batches only: see per_request_errors).
echo_stream  decoupled: one response per decoded block ({text so far, this block's tokens, block,
             final=0}), then the finished report (final=1, with every field of `echo`). A bad
             image ends the stream with an error that carries the runtime's message.

Inputs of both: image (BYTES: PNG, JPEG or DICOM bytes; base64 text also accepted, for JSON
clients such as curl), optional format (text|json|dicom-sr|fhir) and name (a file name for
messages), and for a teacher's engine optional steps (INT32, 1..B) and rule (sequential,
low_confidence_static, low_confidence_dynamic, ...): the multi-step decode, checked per image. Plain KServe v2: tritonclient, curl, any HTTP/gRPC client.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import queue
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

from .pool import EnginePool, Item, Result

UNARY, STREAM = "echo", "echo_stream"
ERROR_KEY = "__echo_error__"  # a hidden output: the request's input error, turned into a 400 by the proxy patch
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")


def image_bytes(value: Any) -> bytes:
    """The image bytes of one BYTES element: raw (binary tensor data, as tritonclient sends), or
    base64 text (the JSON protocol cannot carry raw bytes). Anything else passes through as it
    is, and the runtime's decoder says what is wrong with it."""
    data = bytes(value) if not isinstance(value, str) else value.encode("latin-1")
    if data.startswith(_MAGIC) or data[128:132] == b"DICM" or not data:
        return data
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if decoded.startswith(_MAGIC) or decoded[128:132] == b"DICM" else data


def _strings(req, name: str, n: int) -> list[str]:
    if name not in req.keys():
        return [""] * n
    a = np.asarray(req[name]).reshape(-1)
    vals = [v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in a]
    return (vals * n)[:n] if len(vals) == 1 else (vals + [""] * n)[:n]


def _items(req) -> list[Item]:
    imgs = np.asarray(req["image"], dtype=object)
    flat = imgs.reshape(imgs.shape[0], -1)[:, 0] if imgs.ndim > 1 else imgs.reshape(-1)
    n = len(flat)
    names, fmts, rules = _strings(req, "name", n), _strings(req, "format", n), _strings(req, "rule", n)
    steps = _ints(req, "steps", n)
    return [Item(image_bytes(v), names[j] or "image", fmts[j].strip().lower(), steps[j], rules[j].strip())
            for j, v in enumerate(flat)]


def _ints(req, name: str, n: int) -> list[Optional[int]]:
    """An optional integer input per image (one value: every image), None where not given."""
    if name not in req.keys():
        return [None] * n
    vals = [int(v) for v in np.asarray(req[name]).reshape(-1)]
    return (vals * n)[:n] if len(vals) == 1 else (vals + [None] * n)[:n]


def _obj(values: list[bytes | str]) -> np.ndarray:
    return np.array([[v.encode("utf-8") if isinstance(v, str) else v] for v in values], dtype=object)


def _i32(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int32).reshape(-1, 1)


def _report_outputs(results: list[Result]) -> dict[str, np.ndarray]:
    """The outputs of `echo` (and of the last `echo_stream` response), one row per image."""
    width = max([1] + [len(r.report.tokens) for r in results])
    tokens = np.full((len(results), width), -1, np.int64)
    for row, r in enumerate(results):
        tokens[row, : len(r.report.tokens)] = r.report.tokens
    rep = [r.report for r in results]
    return {
        "text": _obj([r.text for r in rep]),
        "tokens": tokens,
        "forward_passes": _i32([r.forward_passes for r in rep]),
        "stop": _obj([r.stop for r in rep]),
        "error": _obj([r.error or "" for r in rep]),
        "timings": _obj([json.dumps(r.timings) for r in rep]),
        "document": _obj([r.document for r in results]),
        "batch_items": _i32([r.batch_items for r in results]),
        "graph_batch": _i32([r.graph_batch for r in results]),
        "instance": _i32([r.instance for r in results]),
    }


INPUTS = [Tensor(name="image", dtype=bytes, shape=(1,)),
          Tensor(name="format", dtype=bytes, shape=(1,), optional=True),
          Tensor(name="name", dtype=bytes, shape=(1,), optional=True),
          # the multi-step teacher (a teacher's engine): steps per block (1..B) and the unmask rule
          Tensor(name="steps", dtype=np.int32, shape=(1,), optional=True),
          Tensor(name="rule", dtype=bytes, shape=(1,), optional=True)]
REPORT_OUTPUTS = [Tensor(name="text", dtype=bytes, shape=(1,)), Tensor(name="tokens", dtype=np.int64, shape=(-1,)),
                  Tensor(name="forward_passes", dtype=np.int32, shape=(1,)),
                  Tensor(name="stop", dtype=bytes, shape=(1,)),
                  Tensor(name="error", dtype=bytes, shape=(1,)), Tensor(name="timings", dtype=bytes, shape=(1,)),
                  Tensor(name="document", dtype=bytes, shape=(1,)),
                  Tensor(name="batch_items", dtype=np.int32, shape=(1,)),
                  Tensor(name="graph_batch", dtype=np.int32, shape=(1,)),
                  Tensor(name="instance", dtype=np.int32, shape=(1,))]
STREAM_OUTPUTS = REPORT_OUTPUTS + [Tensor(name="block", dtype=np.int32, shape=(1,)),
                                   Tensor(name="final", dtype=np.int32, shape=(1,))]


def unary_infer(pool: EnginePool, instance: int):
    """The `echo` callable of one model instance: every request of a Triton batch, one decode."""

    def infer(requests):
        items: list[Item] = []
        owners: list[int] = []
        for r, req in enumerate(requests):
            mine = _items(req)
            items += mine
            owners += [r] * len(mine)
        results = pool.decode(items, instance=instance)
        out = []
        for r in range(len(requests)):
            mine = [res for res, o in zip(results, owners) if o == r]
            answer = _report_outputs(mine)
            errors = [res.report.error for res in mine if res.report.error]
            if errors:  # this request alone fails, with the runtime's message (per_request_errors)
                answer[ERROR_KEY] = np.array(["; ".join(errors).encode("utf-8")], dtype=object)
            out.append(answer)
        return out

    infer.__name__ = f"echo_infer_{instance}"
    return infer


def _squeeze(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A one-image row set without its batch dimension (the streaming model does not batch)."""
    return {k: v[0] for k, v in out.items()}


def stream_infer(pool: EnginePool, instance: int):
    """The `echo_stream` callable of one model instance: an async generator of responses."""

    async def infer(requests):
        if len(requests) != 1:  # an unbatched model gets one request per execution
            raise RuntimeError(f"{STREAM} expects one request per execution, got {len(requests)}")
        items = _items(requests[0])
        if len(items) != 1:
            raise ValueError(f"{STREAM} streams one image per request, got {len(items)}")
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                res = pool.decode(items, instance=instance, on_block=lambda _k, ev: events.put(("block", ev)))[0]
                events.put(("done", res))
            except BaseException as e:  # handed to the client as the stream's error
                events.put(("fail", e))

        threading.Thread(target=work, name=f"echo-stream-{instance}", daemon=True).start()
        loop = asyncio.get_running_loop()
        while True:
            kind, x = await loop.run_in_executor(None, events.get)
            if kind == "block":
                yield [{"text": np.array([x.text.encode("utf-8")], dtype=object),
                        "tokens": np.array(x.tokens or [-1], np.int64), "block": np.array([x.block], np.int32),
                        "final": np.array([0], np.int32)}]
            elif kind == "done":
                if x.report.error is not None:  # the runtime's message as the stream's error, no traceback
                    yield [{ERROR_KEY: np.array([x.report.error.encode("utf-8")], dtype=object)}]
                    return
                out = _squeeze(_report_outputs([x]))
                out.update(block=np.array([-1], np.int32), final=np.array([1], np.int32))
                yield [out]
                return
            else:
                raise x

    infer.__name__ = f"echo_stream_infer_{instance}"
    return infer


_PROXY_PATCH = f"""

# --- added by echo-serve (echo_serve/triton_models.py, per_request_errors) ---
# One request of a dynamic batch fails alone, as INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT),
# when the inference callable answers it with the {ERROR_KEY} output; the others are answered.
_pytriton_wrap_response = _wrap_response


def _wrap_response(response, requested_outputs_names, model_outputs_dict):
    data = response.data or {{}}
    if "{ERROR_KEY}" in data:
        msg = data["{ERROR_KEY}"].reshape(-1)[0]
        msg = bytes(msg).decode("utf-8", "replace") if not isinstance(msg, str) else msg
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INVALID_ARG))
    return _pytriton_wrap_response(response, requested_outputs_names, model_outputs_dict)
"""
_WRAP_DEF = "\ndef _wrap_response("


def per_request_errors(workspace: Path, model_name: str = UNARY) -> Path:
    """Let one request of a batch fail alone, with a 4xx and the runtime's message.

    PyTriton 0.7's proxy model (the Python-backend model.py it copies into the model store at
    bind time) can only fail a whole batch, as an internal error (HTTP 500): an exception of the
    inference callable fails every request Triton batched with the bad one. Triton's Python
    backend itself answers each request of a batch on its own (InferenceResponse(error=
    TritonError(msg, INVALID_ARG)) -> HTTP 400), so the model's copy of model.py gets a wrapper
    around PyTriton's _wrap_response that does that for answers carrying ERROR_KEY. Called after
    bind and before Triton starts; raises RuntimeError when the file is not the expected one
    (another PyTriton), rather than serve 500s."""
    found = [p for p in Path(workspace).rglob("model.py") if p.parent.name == "1" and p.parent.parent.name == model_name]
    if len(found) != 1:
        raise RuntimeError(f"PyTriton's proxy model.py of {model_name!r} not found once under {workspace}: {found}")
    src = found[0].read_text()
    if src.count(_WRAP_DEF) != 1 or "pb_utils.InferenceResponse" not in src:
        raise RuntimeError(f"{found[0]} is not PyTriton 0.7's proxy model (no def _wrap_response); cannot patch it")
    if _PROXY_PATCH not in src:
        found[0].write_text(src + _PROXY_PATCH)
    return found[0]


def bind(triton, pool: EnginePool, max_queue_delay_us: int = 2000, model_name: str = UNARY,
         stream_name: Optional[str] = STREAM) -> None:
    """Bind `echo` (and `echo_stream`) with one instance per runtime of the pool."""
    n = len(pool.instances)
    preferred = [b for b in pool.built if b > 1] or None
    triton.bind(model_name=model_name, infer_func=[unary_infer(pool, i) for i in range(n)], inputs=INPUTS,
                outputs=REPORT_OUTPUTS,
                config=ModelConfig(max_batch_size=pool.max_batch,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us,
                                                          preferred_batch_size=preferred)))
    if stream_name:
        triton.bind(model_name=stream_name, infer_func=[stream_infer(pool, i) for i in range(n)], inputs=INPUTS,
                    outputs=STREAM_OUTPUTS, config=ModelConfig(batching=False, decoupled=True))
