"""EchoRuntime: reports from an engine folder with NumPy + onnxruntime (or TensorRT), no PyTorch.

Decode semantics mirror the PyTorch references exactly
(echo_train/decoding/block_diffusion.py: fused_onestep_generate, ar.py: ar_generate):

fused one-step   prefill stores the KV of the first P-B prefix tokens in cache slots [0, P-B);
                 pass k feeds [block k-1 (clean), B x MASK] at BlockLayout.fused_positions(k)
                 (block -1 = the last B prefix ids), writes the returned KV of block k-1 into
                 slots [past_len, past_len+B) and reads block k from the graph's `tokens`.
autoregressive   ar_prefill stores the whole prefix and gives token 0; ar_step feeds the last
                 token at position P+i-1 and stores its KV in slot past_len.
Both run one loop (EchoRuntime._decode over a runtime/decode_mode.DecodeMode: what a pass feeds,
stores and reads) and stop when every sequence of the batch has produced EOS, at max_new_tokens, or when the
cache is full. The KV cache is one preallocated array per key/value [L, b, kvH, CAP, dh], in
the step graph's dtype, that the backend reads in place (IO binding).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import graph_io as gio
from . import precisions
from .decode_mode import DecodeMode
from .errors import EchoRuntimeError, ImageReadError, ManifestError
from .manifest import Manifest, check_file, graph_batch_sizes, load_manifest, resolve_graph
from .memory import memory_available_bytes
from .multistep import BlockPasses, MultistepOptions, multistep_blocks
from .native_image import VisionGridSpec, mrope_position_ids, native_image, native_image_from_path
from .preprocess import normalize_image, preprocess_image, preprocess_mode_of
from .prompt import image_start_of
from .schedule import BlockLayout, cut_rows_at_eos, holds_eos
from .text import ReportTokenizer

BACKENDS = ("ort", "trt")
MODES = ("fused", "ar", "multistep")
MODE_STEP_ROLE = {"fused": gio.BLOCK_STEP, "ar": gio.AR_STEP, "multistep": gio.BLOCK_DENOISE}
DEFAULT_MAX_NEW_TOKENS = 128

ImageInput = Union[str, Path, np.ndarray]


@dataclass
class Report:
    """One image's result. `error` is set (and text empty) when the image could not be used."""

    path: str
    text: str = ""
    tokens: list[int] = field(default_factory=list)  # generated ids, cut before EOS
    timings: dict[str, Any] = field(default_factory=dict)  # seconds; shared by a batch
    forward_passes: int = 0  # passes this sequence needed (prefill included)
    error: Optional[str] = None
    stop: str = ""  # "eos", "max_new_tokens" or "capacity"
    image_tokens: int = 0  # the image's tokens in the prompt (native resolution: they follow its size)
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BlockEvent:
    """Passed to `on_block` after every decode pass, for each sequence still writing."""

    index: int  # position of the image in generate()'s input
    path: str
    block: int  # block number (token number in AR mode)
    tokens: list[int]  # this block's new ids, cut at EOS
    text: str  # the report so far
    done: bool  # this block holds EOS


def _n_image_tokens(cfg: dict[str, Any]) -> int:
    if "n_image_tokens" in cfg:
        return int(cfg["n_image_tokens"])
    v = cfg.get("vision") or {}
    try:
        return (int(v["image_size"]) // int(v["patch_size"])) ** 2
    except (KeyError, TypeError, ValueError):
        raise ManifestError("manifest model_config has neither n_image_tokens nor vision image/patch size") from None


@dataclass(frozen=True)
class _Prompt:
    """What one mode's graphs were built for: the prefix ids and the image size."""

    prefix: np.ndarray
    image_size: int


def _dtype(graph, name: str, default) -> Any:
    spec = graph.inputs.get(name) or graph.outputs.get(name)
    return spec[1] if spec and spec[1] is not None else default


def _ids_outputs(graph, batch: int, width: int) -> dict[str, np.ndarray]:
    """Buffers for the per-token outputs (`tokens`, `confidence`) this graph has."""
    defaults = {"tokens": np.int64, "confidence": np.float32}
    return {k: np.zeros((batch, width), _dtype(graph, k, d)) for k, d in defaults.items() if k in graph.outputs}


class _Decoder:
    """Buffers and bound graphs of one mode at one batch size."""

    def __init__(self, rt: "EchoRuntime", mode: str, batch: int) -> None:
        m = rt.manifest
        self.prompt = rt._prompt(mode)
        P = len(self.prompt.prefix)
        self.mode = md = DecodeMode.of(mode, P, rt.block_size)
        self.prefill = rt.graph(md.prefill, batch)
        self.step = rt.graph(rt.step_role(md, batch), batch)
        # in place (graph_io.CPU_ONLY_ROLES): the step writes its KV into the cache itself, from slot past_len
        self.inplace = gio.is_inplace_cache(self.step.inputs)
        if self.inplace:  # one cache input per layer, [b, kvH, CAP + spare, dh]
            L = sum(name.startswith("past_key.") for name in self.step.inputs)
            _, kvH, CAP, dh = self.step.shape("past_key.0")
        else:
            shape = self.step.shape("past_key")
            if len(shape) != 5 or not all(isinstance(d, int) for d in shape):
                lm = m.model_config.get("lm", {})
                shape = (lm["num_hidden_layers"], batch, lm["num_key_value_heads"], m.capacity, lm["head_dim"])
            L, _, kvH, CAP, dh = shape
        self.cap = CAP - (gio.inplace_spare_slots(md.feed) if self.inplace else 0)
        self.block_size = rt.block_size
        if P > self.cap:
            raise ManifestError(f"{rt.engine_dir}: cache capacity {self.cap} is smaller than the {P}-token prefix")
        S, i64 = self.prompt.image_size, np.int64
        self.pixel = np.zeros((batch, 1, S, S), np.float32)
        self.prefix_ids = np.ascontiguousarray(np.broadcast_to(self.prompt.prefix, (batch, P)), dtype=i64)

        def kv(graph, name: str, n: int) -> np.ndarray:  # in the graph's dtype: no pass converts the cache
            return np.zeros((L, batch, kvH, n, dh), _dtype(graph, name, np.float32))

        cache_name = "past_key.0" if self.inplace else "past_key"
        self.cache_k, self.cache_v = kv(self.step, cache_name, CAP), kv(self.step, cache_name, CAP)
        self.input_ids = np.full((batch, md.feed), rt.tokenizer.mask_id, i64)
        self.carry = self.input_ids[:, : md.width]  # what the next pass takes from this one's tokens
        self.position_ids = np.zeros((batch, md.feed), i64)
        self.past_len = np.zeros((batch,), i64)
        self.pre_out = pre_out = {"present_key": kv(self.prefill, "present_key", md.cached),
                                  "present_value": kv(self.prefill, "present_value", md.cached),
                                  **_ids_outputs(self.prefill, batch, 1)}
        if self.inplace:
            cache_in, step_out = gio.inplace_cache_bindings(self.cache_k, self.cache_v)
        else:
            cache_in = {"past_key": self.cache_k, "past_value": self.cache_v}
            step_out = {"present_key": kv(self.step, "present_key", md.width),
                        "present_value": kv(self.step, "present_value", md.width)}
        step_out.update(_ids_outputs(self.step, batch, md.width))
        self.pre_tokens: Optional[np.ndarray] = pre_out.get("tokens")
        self.tokens = step_out["tokens"]
        self.kv = kv
        if not rt.native:  # a native prefill's shapes follow each image: bound per image (_native_prefill)
            self.prefill.bind({"pixel_values": self.pixel, "prefix_ids": self.prefix_ids}, pre_out)
        self.step.bind({"input_ids": self.input_ids, "position_ids": self.position_ids, "past_len": self.past_len,
                        **cache_in}, step_out)

    def store(self, src, start: int) -> None:
        """KV the graph `src` just returned -> cache slots [start, start+n) (on the backend's memory).
        An in-place step stored its own; the prefill's (the arrays bound to it: a native prefill's
        are bound per image) is copied into the host cache."""
        if self.inplace:
            if src is not self.step:
                for cache, name in ((self.cache_k, "present_key"), (self.cache_v, "present_value")):
                    out = src.bound(name)
                    cache[:, :, :, start : start + out.shape[3]] = out
            return
        self.step.kv_store("past_key", src, "present_key", start)
        self.step.kv_store("past_value", src, "present_value", start)


class _Written:
    """The ids a batch has generated so far (one preallocated array) and who is done."""

    def __init__(self, batch: int, n: int, eos_id: int) -> None:
        self.raw = np.zeros((batch, n), np.int64)
        self.start = self.n = 0  # the last pass's ids are raw[:, start:n]
        self.blocks = 0
        self.eos_id = eos_id
        self.done = np.zeros(batch, bool)
        self.passes = np.ones(batch, np.int64)  # the prefill

    def add(self, new: np.ndarray, counts_a_pass: bool = True, skip: int = 0) -> np.ndarray:
        """Append one pass's ids [b, w] (the first `skip` of them prompt ids, not checked for EOS);
        returns which sequences were still writing before it."""
        writing = ~self.done
        self.start, self.n = self.n, self.n + new.shape[1]
        self.raw[:, self.start : self.n] = new
        self.blocks += 1
        if counts_a_pass:
            self.passes = self.passes + writing  # new arrays: cheaper than in-place ufuncs this small
        self.done = self.done | holds_eos(new[:, skip:], self.eos_id)
        return writing


def fp16_cpu_session_bytes(fp16_weights_bytes: int, sessions: int = 1) -> int:
    """About what `sessions` onnxruntime CPU sessions of an engine's fp16 graphs hold: there is no
    fp16 MatMul kernel, so each session folds an fp32 copy (2x the bytes) of the fp16 weights."""
    return precisions.get("fp16").cpu_session_bytes(fp16_weights_bytes, sessions)


# Precisions whose graphs share weights (share_weights=True). fp16 on a CPU: onnxruntime casts each
# fp16 weight to fp32 at load (a Cast reads it, not the MatMul), so there is nothing shared to pack and
# the C library only adds its own ~30 MB (measured: README, runtime).
SHARED_PRECISIONS = precisions.shared_names()


def native_image_of_array(arr: np.ndarray, spec: VisionGridSpec, name: str):
    """A decoded 2-D image (read_image / decode_image_bytes) at its own grid; ImageReadError if unusable."""
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ImageReadError(name, f"expected a finite 2-D image array, got shape {arr.shape}")
    try:
        return native_image(arr, spec)
    except ValueError as e:  # an aspect ratio the processor refuses
        raise ImageReadError(name, str(e)) from None


def _check_options(backend: str, precision: str, mode: str, batch_size: Optional[int]) -> None:
    """EchoRuntime's options, each refused naming the choices (before any file is read)."""
    if backend not in BACKENDS:
        raise EchoRuntimeError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    precisions.get(precision)  # UnknownPrecision (an EchoRuntimeError) naming the choices
    if mode not in MODES:
        raise EchoRuntimeError(f"unknown mode {mode!r}; choose from {MODES}")
    if batch_size is not None and batch_size < 1:
        raise EchoRuntimeError(f"batch_size must be >= 1, got {batch_size}")


def _open_manifest(engine_dir: Path, precision: str) -> Manifest:
    """The folder's verified manifest, which must have graphs of `precision`."""
    if not engine_dir.is_dir():
        raise ManifestError(f"{engine_dir}: engine folder not found")
    m = load_manifest(engine_dir)
    if precision not in m.precisions:
        raise ManifestError(f"{engine_dir}: no {precision} graphs in this engine folder (it has {m.precisions})")
    return m


def _open_tokenizer(engine_dir: Path, m: Manifest) -> ReportTokenizer:
    """The folder's tokenizer, its special ids those the manifest records."""
    try:
        tokenizer = ReportTokenizer.from_file(check_file(engine_dir, m, "tokenizer.json"), m.prompt_template)
    except EchoRuntimeError:
        raise
    except Exception as e:  # tokenizers raises its own exception types
        raise ManifestError(f"{engine_dir / 'tokenizer.json'}: unreadable ({e})") from None
    if (tokenizer.eos_id, tokenizer.mask_id, tokenizer.pad_id) != (m.eos_id, m.mask_id, m.pad_id):
        raise ManifestError(f"{engine_dir}: tokenizer special ids do not match the manifest")
    return tokenizer


class EchoRuntime:
    """Generate reports from an engine folder built by `echo-export build`.

    backend "ort" (onnxruntime; CUDA provider when available, else CPU) or "trt" (TensorRT
    `.plan` engines, the [trt] extra). The folder is refused unless its manifest verifies, and
    each graph's size and sha256 are checked again whenever a graph is loaded.
    batch_size must be one the folder was built for (None: its smallest); graphs have fixed
    shapes, so a call with fewer images than the batch pads by repeating an image.
    share_weights (onnxruntime, CPU, the registry's shares_weights: fp32, int8, int4): the graphs of one precision share one copy of its
    weights (one map of weights.<precision>.bin, one set of packed MatMul weights:
    runtime/ort_capi.py) instead of each holding its own; False: onnxruntime's default, one packed
    copy per graph. fp16 graphs always take the default (SHARED_PRECISIONS).
    inplace_steps (onnxruntime, CPU): each mode runs its step's in-place form where the folder has one
    for the precision and batch (ar_step_inplace, block_step_inplace: one GroupQueryAttention per
    layer over caches written in place, echo_export/inplace_steps.py); False: the standard step, for
    comparisons.
    """

    def __init__(
        self,
        engine_dir: str | Path,
        backend: str = "ort",
        precision: str = "fp32",
        batch_size: Optional[int] = 1,
        threads: Optional[int] = None,
        mode: str = "fused",
        providers: Optional[list[str]] = None,
        share_weights: bool = True,
        max_pixels: Optional[int] = None,
        inplace_steps: bool = True,
    ) -> None:
        _check_options(backend, precision, mode, batch_size)
        self.engine_dir = Path(engine_dir)
        self.manifest = m = _open_manifest(self.engine_dir, precision)
        self.backend, self.precision, self.batch_size, self.threads = backend, precision, batch_size, threads
        self.mode, self.providers = mode, providers
        # onnxruntime CPU: the graphs of one precision share one copy of the weights (runtime/ort_capi.py)
        self.share_weights = share_weights
        self.inplace_steps = inplace_steps  # on onnxruntime's CPU: the in-place steps where the folder has them
        self._weights_map: dict[str, Any] = {}
        self.tokenizer = _open_tokenizer(self.engine_dir, m)
        self.block_size, self.prefix_len, self.image_size = m.block_size, m.prefix_len, m.image_size
        self._read_prompt_and_images(batch_size, max_pixels)
        cfg_max = (m.model_config or {}).get("max_response_tokens")
        self.default_max_new_tokens = int(cfg_max) if cfg_max else DEFAULT_MAX_NEW_TOKENS
        self._graphs: dict[tuple[str, int], Any] = {}
        self._decoders: dict[tuple[str, int], _Decoder] = {}
        self._graph_cls = self._backend_class()
        self._check_fp16_fits_on_cpu()
        self._opening = True  # load_manifest has just hashed every file: a weights file is not hashed twice
        self._decoder(mode, self._batch_for(mode))  # load now: errors surface at construction
        self._opening = False

    def _read_prompt_and_images(self, batch_size: Optional[int], max_pixels: Optional[int] = None) -> None:
        """The prompt and image preparation the manifest records. Native resolution: each image at its
        own grid, so its prompt length follows the image; the manifest's prefix_len and image_size are
        those of the import's nominal square grid. max_pixels: scale images down further than the
        build's bound (fewer image tokens, less prefill memory; the official code uses the bound)."""
        m = self.manifest
        vision = (m.model_config or {}).get("vision") or {}
        self.native = bool(vision.get("native"))
        self.grid_spec = VisionGridSpec.from_config(vision) if self.native else None
        if max_pixels is not None and self.grid_spec is not None:
            if not self.grid_spec.min_pixels <= max_pixels <= self.grid_spec.max_pixels:
                raise EchoRuntimeError(f"max_pixels {max_pixels}: this engine takes {self.grid_spec.min_pixels}.."
                                       f"{self.grid_spec.max_pixels} (its KV cache is sized for the upper bound)")
            self.grid_spec = replace(self.grid_spec, max_pixels=int(max_pixels))
        if self.native and batch_size not in (None, 1):
            raise EchoRuntimeError(f"{self.engine_dir}: native-resolution engines decode one image at a time "
                                   f"(batch 1), not {batch_size}")
        try:
            self.preprocess_mode = preprocess_mode_of(m.model_config)
        except ValueError as e:
            raise ManifestError(f"{self.engine_dir}: manifest model_config: {e}") from None
        self.prefix = np.asarray(self.tokenizer.prefix_ids(_n_image_tokens(m.model_config or {})), dtype=np.int64)
        if len(self.prefix) != self.prefix_len:
            raise ManifestError(f"{self.engine_dir}: prompt has {len(self.prefix)} tokens, manifest says {self.prefix_len}")
        try:
            self.layout = BlockLayout(self.prefix_len, self.block_size)
        except ValueError as e:  # a prompt shorter than a block
            raise ManifestError(f"{self.engine_dir}: {e}") from None
        self.template_image_start = image_start_of(m.model_config, 0)  # native: unpadded, the same for every image

    # -- graphs ----------------------------------------------------------------------
    def _check_fp16_fits_on_cpu(self) -> None:
        """fp16 on onnxruntime's CPU provider: each session folds an fp32 copy of every fp16 weight
        at load (there is no fp16 MatMul kernel), so a prefill and a step graph hold about twice
        the fp32 weights (a 3.75B model: about 30 GB). Refused before loading, with the way out,
        where that exceeds the memory there is, instead of being killed by the kernel mid-load."""
        entry = precisions.get(self.precision)
        if self.backend != "ort" or entry.cpu_memory_factor <= 1:
            return
        from .ort_backend import ort_providers

        if "CUDAExecutionProvider" in (self.providers or ort_providers()):
            return
        weights = self.manifest.files.get(f"weights.{self.precision}.bin")
        free = memory_available_bytes()
        if weights is None or free is None:
            return
        need = entry.cpu_session_bytes(weights.size, sessions=2)
        if need > free:
            raise EchoRuntimeError(
                f"{self.engine_dir}: {self.precision} on a CPU needs about {need / 1e9:.1f} GB (onnxruntime casts the "
                f"{weights.size / 1e9:.1f} GB of {self.precision} weights to fp32 in each of two sessions); {free / 1e9:.1f} GB "
                "is available. Use --precision fp32 (its graphs share one copy of the weights) or int8, or a GPU")

    def _backend_class(self):
        if self.backend == "trt":
            from .trt_backend import TrtGraph, import_tensorrt

            import_tensorrt()  # a clear error naming the [trt] extra when it is missing
            return TrtGraph
        from .ort_backend import OrtGraph

        return OrtGraph

    def graph(self, role: str, batch: int):
        """The session of one graph role at one batch size (opened once, kept)."""
        key = (role, batch)
        if key not in self._graphs:
            prec = self.precision
            try:
                fname = resolve_graph(self.manifest, role, prec, batch)
            except ManifestError:
                if role not in (gio.VISION_PREFILL, gio.AR_PREFILL) or prec == "fp32":
                    raise
                prec = "fp32"  # a folder may build its prefill graphs in fp32 only
                fname = resolve_graph(self.manifest, role, prec, batch)
            if self.backend == "trt":  # plans: graphs[role]["trt-fp16.b1"], else next to the onnx file
                try:
                    fname = resolve_graph(self.manifest, role, f"trt-{prec}", batch)
                except ManifestError:
                    fname = str(Path(fname).with_suffix(".plan"))
            # checked again now: a graph opened long after the folder (AR mode, ...) may have changed since
            same = next((g for (r, b), g in self._graphs.items() if b == batch and g.path.name == Path(fname).name), None)
            if same is not None:  # two roles of one file (a teacher's denoise and commit passes): one session
                self._graphs[key] = same
                return same
            path = check_file(self.engine_dir, self.manifest, fname)
            kw = {}
            if self.backend == "ort" and role in (gio.VISION_PREFILL, gio.AR_PREFILL):
                kw["spin"] = False  # run once per report: its threads would spin into the first steps
            if self.backend == "ort" and self.share_weights and prec in SHARED_PRECISIONS:
                kw["shared_weights"] = self._shared_weights(prec)
            self._graphs[key] = self._graph_cls(path, threads=self.threads, providers=self.providers, **kw)
        return self._graphs[key]

    def step_role(self, md: DecodeMode, batch: int) -> str:
        """The step graph a mode runs: its standard role, or the in-place CPU form of it
        (graph_io.CPU_ONLY_ROLES) where the folder has one for this precision and batch and the
        graphs run on onnxruntime's CPU (inplace_steps=False: the standard one, for comparisons)."""
        from .ort_backend import ort_providers

        cpu = self.backend == "ort" and (self.providers or ort_providers()) == ["CPUExecutionProvider"]
        teacher = gio.BLOCK_DENOISE in self.manifest.graphs  # its passes share the one-step decoder's stacked cache
        for role, standard in gio.CPU_ONLY_ROLES.items():
            if standard == md.step and cpu and self.inplace_steps and not (teacher and standard == gio.BLOCK_STEP):
                try:
                    resolve_graph(self.manifest, role, self.precision, batch)
                    return role
                except ManifestError:
                    pass
        return md.step

    def _shared_weights(self, precision: str):
        """The SharedWeights of weights.<precision>.bin (mapped once; checked whenever a graph that
        reads it loads: its size, and its sha256 unless the folder was verified a moment ago, at
        construction), or None:
        a folder whose graphs carry their own weights, or an onnxruntime without a usable C API."""
        from . import ort_capi

        name = f"weights.{precision}.bin"
        entry = self.manifest.files.get(name)
        if entry is None or entry.size == 0 or ort_capi.api() is None:  # size 0: every tensor inside the graphs
            return None
        # checked whenever a graph reading it loads, like the graph itself (a stat once stamped)
        path = check_file(self.engine_dir, self.manifest, name, check_hash=not getattr(self, "_opening", False))
        if name not in self._weights_map:
            self._weights_map[name] = ort_capi.SharedWeights(path)
        return self._weights_map[name]

    def _prompt(self, mode: str) -> _Prompt:
        """Prefix and image size of a mode. The AR baseline may come from another checkpoint
        (manifest model_config["ar_model_config"], ["ar_prefix_len"]) with its own vision size."""
        cfg = self.manifest.model_config or {}
        if mode == "fused" or "ar_model_config" not in cfg:
            return _Prompt(self.prefix, self.image_size)
        acfg = cfg["ar_model_config"]
        prefix = np.asarray(self.tokenizer.prefix_ids(_n_image_tokens(acfg)), dtype=np.int64)
        if "ar_prefix_len" in cfg and len(prefix) != int(cfg["ar_prefix_len"]):
            raise ManifestError(f"{self.engine_dir}: AR prompt has {len(prefix)} tokens, manifest says {cfg['ar_prefix_len']}")
        return _Prompt(prefix, int((acfg.get("vision") or {}).get("image_size", self.image_size)))

    def built_batch_sizes(self, mode: Optional[str] = None) -> list[int]:
        """Batch sizes this folder has graphs for, in `mode` (default: the runtime's mode)."""
        role = MODE_STEP_ROLE[mode or self.mode]
        return graph_batch_sizes(self.manifest, role, self.precision) or graph_batch_sizes(self.manifest, role, "fp32")

    def _batch_for(self, mode: str) -> int:
        """The graph batch a call runs at: batch_size, which must be built (None: the smallest
        built). A call with fewer images pads its last batch by repeating an image."""
        role = MODE_STEP_ROLE[mode]
        built = self.built_batch_sizes(mode)
        if not built:
            raise ManifestError(f"{self.engine_dir}: no {role} graph in this engine folder")
        if self.batch_size is None:
            return built[0]
        if self.batch_size in built:
            return self.batch_size
        raise ManifestError(f"{self.engine_dir}: no {role} graph for batch {self.batch_size} (built: {built})")

    def _decoder(self, mode: str, batch: int) -> _Decoder:
        key = (mode, batch)
        if key not in self._decoders:
            if mode == "multistep":  # the fused decoder itself (its prefill, cache), with the teacher's passes:
                # graphs are shared per (role, batch), so two decoders would rebind one graph's buffers
                if self.backend != "ort":
                    raise EchoRuntimeError("multi-step decoding runs on onnxruntime (its passes share one host cache)")
                dec = self._decoder("fused", batch)
                dec.passes = BlockPasses(self, dec, batch)
            else:
                dec = _Decoder(self, mode, batch)
            self._decoders[key] = dec
        return self._decoders[key]

    # -- inputs ----------------------------------------------------------------------
    def preprocess(self, image: ImageInput, index: int = 0, image_size: Optional[int] = None):
        """float32 [1, S, S] (a native-resolution engine: a NativeImage, from a path or a decoded 2-D
        image array); ImageReadError for anything unusable."""
        if self.native:
            if isinstance(image, np.ndarray):
                return native_image_of_array(np.squeeze(image), self.grid_spec, f"<array {index}>")
            return native_image_from_path(image, self.grid_spec)
        S = image_size or self.image_size
        if isinstance(image, np.ndarray):
            name = f"<array {index}>"
            a = image
            if a.ndim == 4 and a.shape[0] == 1:
                a = a[0]
            if a.ndim == 2:
                a = a[None]
            if a.shape != (1, S, S):
                raise ImageReadError(name, f"array of shape {image.shape}, expected (1, {S}, {S})")
            a = np.asarray(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise ImageReadError(name, "array values are not finite")
            return a
        return preprocess_image(image, S, self.preprocess_mode)

    def prepare_decoded(self, image: np.ndarray, name: str = "<image>") -> np.ndarray:
        """A decoded image (preprocess.decode_image_bytes / read_image) as generate() takes it: the fixed
        grid's [1, S, S] pixels, or the image itself where each image keeps its own grid (native)."""
        if self.native:
            return np.asarray(image, dtype=np.float32)
        return normalize_image(image, self.image_size, self.preprocess_mode)

    # -- decoding --------------------------------------------------------------------
    def generate(
        self,
        images: Sequence[ImageInput] | ImageInput,
        max_new_tokens: Optional[int] = None,
        on_block: Optional[Callable[[BlockEvent], None]] = None,
        mode: Optional[str] = None,
        multistep: Optional[MultistepOptions] = None,
    ) -> list[Report]:
        """One Report per image, in order. An unreadable image gets Report.error; the rest decode.
        mode "multistep" (a teacher's engine): `multistep` gives steps, rule and threshold."""
        mode = mode or self.mode
        if mode not in MODES:
            raise EchoRuntimeError(f"unknown mode {mode!r}; choose from {MODES}")
        layout = (self.manifest.model_config or {}).get("decode_layout", "echo")
        opts = (multistep or MultistepOptions()).resolved(self.block_size, layout) if mode == "multistep" else None
        if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]
        max_new = int(self.default_max_new_tokens if max_new_tokens is None else max_new_tokens)
        if max_new < 1:
            raise EchoRuntimeError(f"max_new_tokens must be >= 1, got {max_new}")
        batch = self._batch_for(mode)
        dec = self._decoder(mode, batch)
        reports: list[Optional[Report]] = [None] * len(images)
        good = self._read_images(images, dec, reports)
        for s in range(0, len(good), batch):
            chunk = good[s : s + batch]
            if opts is not None:
                decoded = self._decode_multistep(dec, chunk, max_new, on_block, opts)
            else:
                decoded = (self._decode_native if self.native else self._decode)(dec, chunk, max_new, on_block)
            for r, (i, *_rest) in zip(decoded, chunk):
                reports[i] = r
        return reports  # type: ignore[return-value]

    def _read_images(self, images: Sequence[ImageInput], dec: _Decoder,
                     reports: list[Optional[Report]]) -> list[tuple[int, str, np.ndarray, float]]:
        """(index, name, pixels, preprocessing seconds) of every image that reads; an image that does
        not gets its Report (with the error) in `reports` now."""
        good: list[tuple[int, str, np.ndarray, float]] = []
        for i, img in enumerate(images):
            name = f"<array {i}>" if isinstance(img, np.ndarray) else str(img)
            t = time.perf_counter()
            try:
                arr = self.preprocess(img, i, dec.prompt.image_size)
            except ImageReadError as e:
                reports[i] = Report(path=name, error=str(e), timings={"preprocess": time.perf_counter() - t})
                continue
            good.append((i, name, arr, time.perf_counter() - t))
        return good

    def _decode_multistep(self, dec: _Decoder, chunk, max_new: int, on_block, opts: MultistepOptions) -> list[Report]:
        """The teacher: prefill, then per block opts.steps denoise passes and a commit pass."""
        delta = 0
        if self.native:
            got = self._native_prefill(dec, chunk, max_new)
            if isinstance(got, list):
                return got
            _, session, t0, delta = got
        else:
            self._load_pixels(dec, chunk)
            t0 = time.perf_counter()
            session = dec.prefill.run()
            dec.store(dec.prefill, 0)
        t_prefill = time.perf_counter() - t0
        grid = BlockLayout(dec.prefix_ids.shape[1], self.block_size)
        out = _Written(dec.pixel.shape[0], grid.num_blocks(max_new) * self.block_size, self.tokenizer.eos_id)

        def add(x: np.ndarray, skip: int, writing: np.ndarray) -> None:
            out.add(x, counts_a_pass=False, skip=skip)
            self._emit(on_block, chunk, out, writing, grid.tail)

        trace = multistep_blocks(dec.passes, dec, dec.prefix_ids, grid, len(chunk), max_new, opts,
                                 self.tokenizer.mask_id, self.tokenizer.eos_id, delta, add)
        out.passes = trace.passes
        tm = {"prefill": t_prefill, "blocks": trace.times, "decode": time.perf_counter() - t0,
              "session": session + trace.session, "prefill_session": session}
        reports = self._finish(chunk, out, "max_new_tokens", tm, grid.tail)
        return self._tagged(reports, chunk[0][2], dec) if self.native else reports

    def generate_ar(self, images, max_new_tokens: Optional[int] = None, on_block=None) -> list[Report]:
        """The AR baseline (ar_prefill / ar_step graphs) through the same runtime."""
        return self.generate(images, max_new_tokens, on_block, mode="ar")

    def _load_pixels(self, dec: _Decoder, chunk) -> None:
        for r in range(dec.pixel.shape[0]):
            dec.pixel[r] = chunk[min(r, len(chunk) - 1)][2]  # pad a short batch by repeating

    def _finish(self, chunk, out: _Written, stop: str, timings, skip: int) -> list[Report]:
        reports = []
        tokens = cut_rows_at_eos(out.raw[: len(chunk), skip : out.n], self.tokenizer.eos_id, self.tokenizer.mask_id)
        for r, ((i, name, _arr, t_pre), ids) in enumerate(zip(chunk, tokens)):
            tm = dict(timings, preprocess=t_pre, blocks=list(timings["blocks"]))
            tm["total"] = t_pre + tm["decode"]
            reports.append(Report(path=name, text=self.tokenizer.decode(ids), tokens=ids, timings=tm,
                                  forward_passes=int(out.passes[r]), stop="eos" if out.done[r] else stop))
        return reports

    def _emit(self, on_block, chunk, out: _Written, writing: np.ndarray, skip: int = 0) -> None:
        """skip: the prompt ids at the start of the written ids (the official layout's tail)."""
        if on_block is None:
            return
        new = out.raw[:, max(out.start, skip) : out.n]
        for r, (i, name, *_x) in enumerate(chunk):
            if writing[r]:
                on_block(BlockEvent(i, name, out.blocks - 1, self.tokenizer.cut_at_eos(new[r].tolist()),
                                    self.tokenizer.decode(out.raw[r, skip : out.n].tolist()), bool(out.done[r])))

    def _decode(self, dec: _Decoder, chunk, max_new: int, on_block) -> list[Report]:
        """Prefill, then passes until every sequence of the chunk has produced EOS, max_new ids
        are written, or the cache cannot hold the context of another pass."""
        self._load_pixels(dec, chunk)
        t0 = time.perf_counter()
        session = dec.prefill.run()
        dec.store(dec.prefill, 0)
        return self._passes(dec, dec.mode, chunk, max_new, on_block, t0, session)

    def _native_prefill(self, dec: _Decoder, chunk, max_new: int):
        """Prefill one image at its own grid (batch 1); (its DecodeMode with positions at index + rope delta,
        session seconds, start time, rope delta) or an error Report when the cache cannot hold it."""
        image = chunk[0][2]
        ids = np.asarray([self.tokenizer.prefix_ids(image.n_tokens)], np.int64)
        md = DecodeMode.of("fused", ids.shape[1], self.block_size)
        need = md.slots_needed(max_new)
        if need > dec.cap:
            return [Report(path=chunk[0][1], error=f"{chunk[0][1]}: the image takes {image.n_tokens} tokens; the "
                           f"prompt and {max_new} new tokens need {need} cache slots, the engine has {dec.cap} "
                           "(a smaller --max-pixels at build time, or fewer new tokens)")]
        pos, delta = mrope_position_ids(ids.shape[1], self.template_image_start, *image.llm_grid)
        n = md.cached
        feeds = {"pixel_patches": image.patches, "patch_rc": image.patch_rc, "window_gather": image.window_gather,
                 "window_valid": image.window_valid, "window_inverse": image.window_inverse,
                 "prefix_ids": np.ascontiguousarray(ids[:, :n]), "position_ids": np.ascontiguousarray(pos[:, None, :n])}
        outs = {k: dec.kv(dec.prefill, k, n) for k in ("present_key", "present_value")}
        t0 = time.perf_counter()
        dec.prefill.bind({k: np.ascontiguousarray(v) for k, v in feeds.items()}, outs)
        session = dec.prefill.run()
        dec.store(dec.prefill, 0)
        dec.prefix_ids = ids
        return replace(md, first_positions=md.first_positions + delta), session, t0, delta

    def _decode_native(self, dec: _Decoder, chunk, max_new: int, on_block) -> list[Report]:
        """One image at its own grid (batch 1): its own prompt length, prefill shapes and rope delta."""
        got = self._native_prefill(dec, chunk, max_new)
        if isinstance(got, list):
            return got
        md, session, t0, _ = got
        return self._tagged(self._passes(dec, md, chunk, max_new, on_block, t0, session), chunk[0][2], dec)

    @staticmethod
    def _tagged(reports: list[Report], image, dec: _Decoder) -> list[Report]:
        for r in reports:
            r.image_tokens, r.prompt_tokens = image.n_tokens, dec.prefix_ids.shape[1]
        return reports

    def _start_report(self, dec: _Decoder, md: DecodeMode, chunk, max_new: int, on_block) -> tuple[_Written, int, int]:
        """(the reports' buffer, the step passes max_new tokens need, those that can run: the first
        pass that cannot store its KV is the last), with the first pass's input in place: the
        prompt's last whole block and its tail (fused), or the prefill's token 0 written (AR)."""
        w, past = md.width, md.cached
        first = dec.pre_tokens  # AR: the prefill's token 0; fused: none
        n_first = 0 if first is None else first.shape[1]
        n_passes = -(-(max_new + md.tail - n_first) // w)
        n_fit = min(n_passes, (dec.cap - past) // w + 1)
        out = _Written(dec.pixel.shape[0], n_first + n_fit * w, self.tokenizer.eos_id)
        if first is None:  # fused: the last whole prompt block, then the prompt's tail before the masks
            dec.input_ids[:, : dec.prefix_ids.shape[1] - past] = dec.prefix_ids[:, past:]
        else:
            dec.carry[:] = first
            self._emit(on_block, chunk, out, out.add(first, counts_a_pass=False))
        return out, n_passes, n_fit

    def _passes(self, dec: _Decoder, md: DecodeMode, chunk, max_new: int, on_block, t0: float,
                session: float) -> list[Report]:
        """The step passes after a prefill that stored the KV of the first md.cached prompt ids."""
        n, w = len(chunk), md.width
        t_prefill, s_prefill = time.perf_counter() - t0, session
        past = md.cached
        tail = md.tail  # official layout: the prompt's last ids open the first new block
        out, n_passes, n_fit = self._start_report(dec, md, chunk, max_new, on_block)
        positions = md.first_positions + w * np.arange(n_fit)[:, None]  # pass j's, in row j
        times: list[float] = []
        stop = "max_new_tokens"
        for j in range(n_fit):
            if out.done[:n].all():
                break
            tb = time.perf_counter()
            dec.position_ids[:] = positions[j]
            dec.past_len[:] = past
            session += dec.step.run()
            stored = past + w <= dec.cap  # the KV of this pass's first w ids; only the next pass needs it
            if stored:
                dec.store(dec.step, past)
                past += w
            skip = tail if j == 0 else 0
            if skip:  # the tail's ids are kept, whatever the graph read there; later passes start all mask
                dec.tokens[:, :skip] = dec.input_ids[:, w : w + skip]
                dec.input_ids[:, w : w + skip] = self.tokenizer.mask_id
            dec.carry[:] = dec.tokens
            writing = out.add(dec.tokens, skip=skip)
            times.append(time.perf_counter() - tb)
            self._emit(on_block, chunk, out, writing, tail)
            if not stored and j < n_passes - 1 and not out.done[:n].all():
                stop = "capacity"
                break
        tm = {"prefill": t_prefill, "blocks": times, "decode": time.perf_counter() - t0, "session": session,
              "prefill_session": s_prefill}
        return self._finish(chunk, out, stop, tm, tail)
