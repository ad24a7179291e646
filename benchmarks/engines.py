"""Engine adapters: one `Runner` per (method, engine, block size), all with the same `decode(paths)`.

Engines
  pytorch-cpu / pytorch-cuda   the PyTorch reference decoders (echo_train.decoding), eager
  ort-<precision>              runtime.EchoRuntime over an engine folder (onnxruntime), one per registry precision
  trt-<precision>              runtime.EchoRuntime(backend="trt") where TensorRT and a GPU exist
  hf-cpu / hf-cuda             Hugging Face `transformers` generate() on the same AR weights: the
                               peer baseline a user would otherwise pick (AR only)

Methods
  ar       stage-1 checkpoint, greedy with a KV cache
  teacher  stage-2 checkpoint, `steps = B` denoising passes per block (multi-step); "teacher@k":
           k passes per block (the steps sweep). On onnxruntime: the block_denoise / block_commit
           graphs of an engine folder built from the teacher (--naive-engine-dir)
  naive    stage-2 checkpoint decoded one step per block, fused (same passes as DCD; only the
           weights differ). On onnxruntime: the same teacher engine folder's block_step.
  dcd      stage-3 checkpoint, fused one-step decoding

A cell that cannot run raises `Unavailable(reason)`; the harness records "not available: reason".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from runtime import precisions

METHODS = ("ar", "teacher", "naive", "dcd")
ORT_PRECISIONS = precisions.NAMES  # the precision registry (runtime/precisions.py)
DEFAULT_BLOCK = 8  # the block size whose checkpoints / engines carry no "-bN" suffix



def _torch_inputs(model, paths: Sequence[str], device: str, bf16: bool):
    """Preprocessed pixels on the device, and the autocast context of a PyTorch engine."""
    import torch

    from runtime.preprocess import preprocess_image

    S = model.cfg.vision.image_size
    px = torch.from_numpy(np.stack([preprocess_image(p, S, model.cfg.vision.preprocess) for p in paths])).to(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.startswith("cuda")) else contextlib.nullcontext()
    return px, ctx

class Unavailable(Exception):
    """This cell cannot run here; str(e) says why."""


@dataclass
class Decoded:
    tokens: list[int]  # cut before EOS
    text: str
    passes: int  # forward passes of this report (prefill included; the batch's count when batched)
    eos: bool  # EOS was produced (then it counts as a generated token)
    session_s: Optional[float] = None  # seconds inside session.run (runtime engines)
    decode_s: Optional[float] = None  # the runtime's own decode time
    prefill_s: Optional[float] = None  # of which the prefill pass (vision + prompt)
    prefill_session_s: Optional[float] = None  # of session_s, the prefill pass
    decode_passes: Optional[int] = None  # passes after prefill that the runtime ran (the batch's)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) + int(self.eos)


@dataclass
class Paths:
    """Where checkpoints and engine folders live; block sizes other than 8 get a `-bN` suffix."""

    ar_ckpt: str = "runs/ar"
    teacher_ckpt: str = "runs/base"
    dcd_ckpt: str = "runs/echo"
    engine_dir: str = "engines/echo"
    naive_engine_dir: str = "engines/base"

    @staticmethod
    def for_block(base: str, block_size: Optional[int]) -> Path:
        if block_size is None or block_size == DEFAULT_BLOCK:
            return Path(base)
        return Path(f"{base}-b{block_size}")


def engine_names(device: str) -> list[str]:
    """Every engine name this harness knows, for this device choice."""
    torch_dev = ["pytorch-cuda"] if device == "cuda" else ["pytorch-cpu"]
    hf = ["hf-cuda"] if device == "cuda" else ["hf-cpu"]
    return torch_dev + [f"ort-{p}" for p in ORT_PRECISIONS] + [f"trt-{p}" for p in ORT_PRECISIONS] + hf


def select_engines(spec: str, device: str) -> list[str]:
    """`all` or a comma list of names or prefixes (pytorch, ort, ort-fp16, trt, hf)."""
    known = engine_names(device)
    if spec.strip() in ("", "all"):
        return known
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [e for e in known if e == item or e.startswith(item + "-") or e.startswith(item)]
        if item in ("torch", "pytorch"):
            hits = [e for e in known if e.startswith("pytorch")]
        if not hits:
            raise ValueError(f"unknown engine {item!r}; choose from {', '.join(known)} (or a prefix: pytorch, ort, trt, hf)")
        out += [h for h in hits if h not in out]
    return out


# ----------------------------------------------------------------------------- checkpoints
class ModelCache:
    """Loads each checkpoint once per device."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], tuple] = {}

    def get(self, path: Path, device: str, want_stage: Optional[tuple[str, ...]] = None,
            block_size: Optional[int] = None):
        from echo_train.model.checkpoint import CheckpointError, load_checkpoint

        key = (str(path), device)
        if key not in self._models:
            if not Path(path).is_dir():
                raise Unavailable(f"{path} missing")
            try:
                model, tok = load_checkpoint(path)
            except CheckpointError as e:
                raise Unavailable(str(e)) from None
            self._models[key] = (model.to(device).eval(), tok)
        model, tok = self._models[key]
        if want_stage and model.cfg.stage not in want_stage:
            raise Unavailable(f"{path} is a stage {model.cfg.stage!r} checkpoint, expected {'/'.join(want_stage)}")
        if block_size is not None and model.cfg.stage != "ar" and model.cfg.block_size != block_size:
            raise Unavailable(f"{path} has block size {model.cfg.block_size}, not {block_size}")
        return model, tok


# ----------------------------------------------------------------------------- PyTorch eager
class TorchRunner:
    """The PyTorch reference decoders, batch = len(paths)."""

    def __init__(self, model, tok, mode: str, block_size: int, steps: Optional[int], max_new: int,
                 device: str = "cpu", bf16: bool = False) -> None:
        from echo_train.decoding.run import DecodeSpec

        self.model, self.tok, self.device, self.bf16 = model, tok, device, bf16
        self.spec = DecodeSpec(mode=mode, block_size=block_size, steps=steps, max_new_tokens=max_new)

    def decode(self, paths: Sequence[str]) -> list[Decoded]:
        import torch

        from echo_train.decoding.run import decode_batch

        px, ctx = _torch_inputs(self.model, paths, self.device, self.bf16)
        with ctx:
            res = decode_batch(self.model, self.tok, px, self.spec)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        out = []
        for ids, row in zip(res.tokens, res.raw.tolist()):
            out.append(Decoded(ids, self.tok.decode(ids), res.forward_passes, self.tok.eos_id in row))
        return out


# ----------------------------------------------------------------------------- Hugging Face
def hf_causal_lm(model):
    """A `transformers` Qwen2ForCausalLM (Qwen3 with QK-norm) holding our LM's weights.

    Our decoder uses Hugging Face parameter names, so the state dict loads unchanged.
    """
    import torch
    import transformers

    lm = model.cfg.lm
    common = dict(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                  num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
                  num_key_value_heads=lm.num_key_value_heads, head_dim=lm.head_dim, rope_theta=lm.rope_theta,
                  rms_norm_eps=lm.rms_norm_eps, tie_word_embeddings=lm.tie_word_embeddings,
                  max_position_embeddings=lm.max_position_embeddings)
    if lm.qk_norm:
        cfg = transformers.Qwen3Config(**common, attention_bias=lm.attention_bias)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)  # q/k/v biases always exist; zero when ours has none
        cls = transformers.Qwen2ForCausalLM
    cfg._attn_implementation = "eager"
    hf = cls(cfg)
    state = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m.endswith("_proj.bias") and not lm.attention_bias)
               and not (m == "lm_head.weight" and lm.tie_word_embeddings)]
    unexpected = [u for u in unexpected if "rotary" not in u]
    if missing or unexpected:
        raise Unavailable(f"transformers model does not take our weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not lm.attention_bias and not lm.qk_norm:
        with torch.no_grad():
            for layer in hf.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if p.bias is not None:
                        p.bias.zero_()
    if lm.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)


def hf_generate(hf, model, tok, pixel_values, max_new_tokens: int):
    """Greedy `generate()` from our prefix embeddings; returns [b, n] new token ids (a tensor)."""
    import torch
    from echo_train.decoding.common import prefix_ids_tensor

    b, dev = pixel_values.shape[0], pixel_values.device
    with torch.no_grad():
        embeds = model.embed_prefix(pixel_values, prefix_ids_tensor(tok, model, b, dev))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
        with _quiet_transformers():
            return hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                               temperature=None, top_p=None, top_k=None)


class HFRunner:
    def __init__(self, model, tok, max_new: int, device: str = "cpu", bf16: bool = False) -> None:
        self.model, self.tok, self.max_new, self.device, self.bf16 = model, tok, max_new, device, bf16
        self.hf = hf_causal_lm(model).to(device)

    def decode(self, paths: Sequence[str]) -> list[Decoded]:
        import torch

        px, ctx = _torch_inputs(self.model, paths, self.device, self.bf16)
        with ctx:
            out = hf_generate(self.hf, self.model, self.tok, px, self.max_new)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        res = []
        for row in out.tolist():
            ids = self.tok.cut_at_eos(row)
            eos = self.tok.eos_id in row
            res.append(Decoded(ids, self.tok.decode(ids), len(ids) + int(eos), eos))  # one forward per new token
        return res


# ----------------------------------------------------------------------------- runtime engines
class RuntimeCache:
    """One EchoRuntime per (engine folder, backend, precision, batch, mode).

    Per mode because one EchoRuntime that ran the fused mode decodes the multi-step mode from a
    stale prefill afterwards (every image got the last image's report; tests/test_bench_teacher.py
    keeps that case as a strict xfail until runtime/ fixes it)."""

    def __init__(self, threads: Optional[int]) -> None:
        self.threads = threads
        self._rts: dict[tuple, object] = {}

    def get(self, engine_dir: Path, backend: str, precision: str, batch: int, mode: str):
        from runtime.errors import EchoRuntimeError

        key = (str(engine_dir), backend, precision, batch, mode)
        if key not in self._rts:
            if not (Path(engine_dir) / "manifest.json").is_file():
                raise Unavailable(f"{engine_dir} missing" if not Path(engine_dir).exists()
                                  else f"{engine_dir}/manifest.json missing (the build did not finish)")
            try:
                from runtime import EchoRuntime

                self._rts[key] = EchoRuntime(engine_dir, backend=backend, precision=precision, batch_size=batch,
                                             threads=self.threads, mode=mode)
            except (EchoRuntimeError, ImportError) as e:
                raise Unavailable(f"{type(e).__name__}: {e}") from None
        rt = self._rts[key]
        built = rt.built_batch_sizes(mode)  # the graphs of this mode exist at this batch
        if batch not in built:
            raise Unavailable(f"{engine_dir}: no {mode}-mode graph built for batch {batch} (built: {built or 'none'})")
        return rt


class RuntimeRunner:
    """runtime.EchoRuntime in one mode; `multistep` (steps, rule, threshold) for the teacher's graphs."""

    def __init__(self, rt, mode: str, max_new: int, multistep=None) -> None:
        self.rt, self.mode, self.max_new, self.multistep = rt, mode, max_new, multistep
        self.batch = rt.batch_size

    def decode(self, paths: Sequence[str]) -> list[Decoded]:
        reports = self.rt.generate(list(paths), max_new_tokens=self.max_new, mode=self.mode, multistep=self.multistep)
        out = []
        for r in reports:
            if not r.ok:
                raise RuntimeError(f"{r.path}: {r.error}")
            tm = r.timings
            out.append(Decoded(list(r.tokens), r.text, r.forward_passes, r.stop == "eos",
                               session_s=tm.get("session"), decode_s=tm.get("decode"), prefill_s=tm.get("prefill"),
                               prefill_session_s=tm.get("prefill_session"), decode_passes=len(tm.get("blocks", []))))
        return out


def trt_unavailable_reason() -> Optional[str]:
    """None when the runtime's TensorRT backend can run here, else the reason it cannot (the
    runtime's own check: tensorrt, cuda-python and a CUDA device)."""
    from runtime.trt_backend import trt_available

    ok, why = trt_available()
    return None if ok else why


def engine_manifest(engine_dir: Path):
    """The folder's runtime.manifest.Manifest, or None when it has none or the runtime would refuse it.
    Hashes are left to the runtime, which checks them when it opens the folder."""
    from runtime.errors import ManifestError
    from runtime.manifest import load_manifest

    try:
        return load_manifest(engine_dir, check_hashes=False)
    except ManifestError:
        return None


def engine_manifest_info(engine_dir: Path) -> dict:
    """What results.json records of an engine folder ({} without a usable manifest)."""
    m = engine_manifest(engine_dir)
    return {} if m is None else {k: getattr(m, k) for k in ("block_size", "capacity", "batch_sizes", "precisions",
                                                            "verified", "versions", "int8")}
