"""Peer AR engines beside ours: what a user would run instead of this runtime on a CPU.

    python -m benchmarks.peers prepare --size 0.5b [--install]   # our engine, the HF decoder, the peers' models
    python -m benchmarks.peers run --size 0.5b                   # the table (benchmarks/results/peers/)

Peers (the optional extra `peers` in pyproject.toml; `--install` installs it, otherwise a peer
whose package or converter is missing is skipped and the table says why):

- onnxruntime-genai: its model builder (`python -m onnxruntime_genai.models.builder`) on the
  Hugging Face Qwen2ForCausalLM folder, fp32 / int8 / int4 (weight-only MatMulNBits, its defaults:
  block 32, accuracy_level 4 on CPU), run with `og.Generator`.
- llama.cpp through llama-cpp-python: GGUF written by the converter its source ships
  (vendor/llama.cpp/convert_hf_to_gguf.py of the llama-cpp-python sdist), f32, then quantised to
  Q8_0 and Q4_K_M with llama.cpp's own `llama_model_quantize`; run token by token with `Llama.eval`.

The Hugging Face folder holds exactly our random-weight checkpoint's decoder (the scale ladder's
`qwen2.5-<size>` rung: a Qwen2.5 decoder at the real shapes + ViT-B/16), with a byte-level BPE
tokenizer in Qwen2's layout (benchmarks/random_qwen_vl.py); the peers are text-only, so every engine
is compared on the decode phase: the same context length as our prefix (image tokens + prompt),
greedy, 128 new tokens, batch 1, the same threads. Our rows: the runtime's AR loop (on the CPU its
in-place `ar_step_inplace` where the folder has it, else `ar_step`) and one-step loop (likewise
`block_step_inplace` or `block_step`, B tokens per pass) on the same folder, decode phase only, plus the per-pass times of that AR step /
block_step (benchmarks/ideal.py) beside the peers' seconds per token.

Every engine runs in its own subprocess (its RSS is its own), one after another in one run, so the
ratios come from the same machine state; the load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.sysinfo import status_mb
from runtime import precisions as precision_registry

WORK = Path("benchmarks/out/peers")
RESULTS = Path("benchmarks/results/peers")
NEW_TOKENS = 128
GENAI_PRECISIONS = "fp32,int8,int4".split(",")  # the model builder's -p names (not this registry's)
GGUF_TYPES = {"f32": None, "Q8_0": 7, "Q4_K_M": 15}  # llama.h LLAMA_FTYPE_MOSTLY_* (f32: the converter's own output)
# the precision class each engine variant belongs to (the goal: ours >= the best peer of its class)
CLASS_OF = {"fp32": "fp32", "f32": "fp32", "int8": "8-bit", "int8w": "8-bit", "int8dyn": "8-bit", "Q8_0": "8-bit",
            "int4": "4-bit", "Q4_K_M": "4-bit"}
OUR_PRECISIONS = tuple(precision_registry.parse_list("int8w,int4,int8dyn"))  # fp32 comes along


# ----------------------------------------------------------------------------- availability
def _extra_requirements() -> list[str]:
    """The `peers` extra of pyproject.toml, as pip requirement strings."""
    import tomllib

    py = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return tomllib.loads(py.read_text())["project"]["optional-dependencies"]["peers"]


def missing_peers() -> dict[str, Optional[str]]:
    """Per peer: None when it can run here, else why not (a missing package, said as pip would)."""
    out: dict[str, Optional[str]] = {}
    for peer, modules in (("onnxruntime-genai", ("onnxruntime_genai",)), ("llama.cpp", ("llama_cpp", "gguf"))):
        why = None
        for mod in modules:
            try:
                importlib.import_module(mod)
            except Exception as e:  # ImportError, or a wheel that does not load on this CPU / libc
                why = f"{mod} not importable ({type(e).__name__}: {e}); `pip install -c constraints.txt -e '.[peers]'`"
                break
        out[peer] = why
    return out


def install_peers() -> Optional[str]:
    """pip-installs the `peers` extra into this interpreter (llama-cpp-python compiles from source:
    minutes); returns None or why it failed."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pip", "install", "-c", str(root / "constraints.txt"), *_extra_requirements()]
    print("[peers] $ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    return None if p.returncode == 0 else f"pip install failed (exit {p.returncode}): {p.stderr.strip()[-300:]}"


def gguf_converter(work: Path) -> tuple[Optional[Path], Optional[str]]:
    """llama.cpp's convert_hf_to_gguf.py from the sdist of the installed llama-cpp-python (the
    converter of the same llama.cpp the wheel was built from), extracted into work/; or why not."""
    try:
        from importlib.metadata import version

        ver = version("llama-cpp-python")
    except Exception as e:
        return None, f"llama-cpp-python not installed ({e})"
    root = work / f"llama-cpp-python-{ver}-src"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script, None
    dl = work / "sdist"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={ver}",
           "-d", str(dl)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    tars = sorted(dl.glob(f"llama_cpp_python-{ver}.tar.gz"))
    if p.returncode != 0 or not tars:
        return None, f"llama-cpp-python {ver} sdist not downloadable: {p.stderr.strip()[-200:]}"
    import tarfile

    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    with tarfile.open(tars[0]) as t:
        members = [m for m in t.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "gguf-py/")
            or m.name.startswith(prefix + "conversion/"))]
        for m in members:
            m.name = m.name[len(prefix):]
        root.mkdir(parents=True, exist_ok=True)
        t.extractall(root, members=members, filter="data")
    return (script, None) if script.is_file() else (None, f"no convert_hf_to_gguf.py in {tars[0].name}")


# ----------------------------------------------------------------------------- the Hugging Face decoder
def write_hf_decoder(ckpt: Path, out: Path, tokenizer_vocab: int = 1000) -> Path:
    """A Qwen2ForCausalLM folder holding `ckpt`'s decoder (an ECHO checkpoint, tied embeddings):
    config.json, model.safetensors (its `lm.*` tensors renamed to the hub's names, same values and
    dtype), and a byte-level BPE tokenizer in Qwen2's layout trained on synthetic reports."""
    import transformers
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from .random_qwen_vl import QWEN_SPECIALS, report_corpus, train_qwen_tokenizer

    cfg = json.loads((ckpt / "config.json").read_text())["lm"]
    if not cfg.get("tie_word_embeddings", False):
        raise SystemExit(f"{ckpt}: untied embeddings are not written here (the scale rungs tie them)")
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    n_ids = train_qwen_tokenizer(tmp, report_corpus(200), tokenizer_vocab)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    eos = tok.token_to_id(QWEN_SPECIALS[0])
    tensors = {}
    with safe_open(str(ckpt / "model.safetensors"), framework="np") as f:
        for k in f.keys():
            if not k.startswith("lm."):
                continue
            name = k[3:]
            tensors["model.embed_tokens.weight" if name == "lm_head.weight" else name] = f.get_tensor(k)
    dtype = {np.dtype("float32"): "float32", np.dtype("float16"): "float16"}.get(next(iter(tensors.values())).dtype, "bfloat16")
    hf = transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_theta"])}, dtype=dtype)
    hf.architectures = ["Qwen2ForCausalLM"]
    if cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise SystemExit(f"{ckpt}: head_dim {cfg['head_dim']} is not hidden/heads (Qwen2's)")
    hf.save_pretrained(str(tmp))
    d = json.loads((tmp / "config.json").read_text())
    d.setdefault("rope_theta", float(cfg["rope_theta"]))  # older readers (the GGUF converter) look for it here
    (tmp / "config.json").write_text(json.dumps(d, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": QWEN_SPECIALS[0], "pad_token": QWEN_SPECIALS[0],
        "bos_token": None, "model_max_length": cfg["max_position_embeddings"], "add_prefix_space": False}, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[peers] {out}: Qwen2ForCausalLM, {len(tensors)} tensors ({dtype}), tokenizer of {n_ids} ids", flush=True)
    return out


# ----------------------------------------------------------------------------- the peers' models
def build_genai(hf: Path, out: Path, precision: str, threads: int) -> Path:
    """onnxruntime-genai's model builder on the HF folder (CPU, its defaults for `precision`), its
    decoder session then pinned to `threads` intra-op threads in genai_config.json."""
    if not (out / "genai_config.json").is_file():
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp), "-p", precision,
               "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        print("[peers] $ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        shutil.rmtree(out.parent / "genai-cache", ignore_errors=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return out


def convert_gguf(hf: Path, out: Path, script: Path, threads: int) -> Path:
    """The f32 GGUF of the HF folder, by the converter llama.cpp ships. Its tokenizer check knows
    published tokenizers by a hash of their output; ours (trained here, Qwen2's split regex and
    byte-level BPE) is named "qwen2", the pre-tokenizer it has."""
    if out.is_file():
        return out
    root = script.parent
    code = (
        "import sys, runpy\n"
        f"sys.path[:0] = [{str(root)!r}, {str(root / 'gguf-py')!r}]\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(hf)!r}, '--outtype', 'f32', '--outfile', {str(out) + '.tmp'!r}]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    print(f"[peers] convert_hf_to_gguf.py {hf} --outtype f32 --outfile {out}", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    Path(str(out) + ".tmp").rename(out)
    return out


def quantize_gguf(src: Path, out: Path, ftype: int, threads: int) -> Path:
    """llama.cpp's own quantiser (llama_model_quantize in libllama, as `llama-quantize` calls it)."""
    if out.is_file():
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    tmp = str(out) + ".tmp"
    print(f"[peers] llama_model_quantize {src.name} -> {out.name} (ftype {ftype})", flush=True)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    Path(tmp).rename(out)
    return out


# ----------------------------------------------------------------------------- probes (one engine per process)
def _median_run(runs: list[dict]) -> dict:
    """The run of median decode speed, with every run's tokens/s kept."""
    tps = [r["decode_tokens_per_s"] for r in runs]
    med = sorted(runs, key=lambda r: r["decode_tokens_per_s"])[len(runs) // 2]
    return {**med, "runs_tokens_per_s": tps}


def genai_runner(path: Path, prompt: list[int], new: int) -> tuple[Callable[[], dict], dict]:
    """(one greedy decode of `new` tokens after `prompt` through onnxruntime-genai's generator ->
    its timings, what loading it gave: load_s, weight_bytes, version)."""
    import onnxruntime_genai as og

    t = time.perf_counter()
    model = og.Model(og.Config(str(path)))
    info = {"load_s": time.perf_counter() - t, "version": og.__version__,
            "weight_bytes": sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data"))}

    def run() -> dict:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)  # the prefill forward
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < new:
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        made = len(gen.get_sequence(0)) - len(prompt)
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": made, "decode_tokens_per_s": made / (t2 - t1)}

    return run, info


def llama_runner(path: Path, prompt: list[int], new: int, threads: int) -> tuple[Callable[[], dict], dict]:
    """As genai_runner, token by token through libllama's own decode (llama_decode), greedy over the
    last logits; the Python wrapper's per-context logits matrix is not allocated (it would add n_ctx
    x vocab floats)."""
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new + 8, n_batch=len(prompt), n_ubatch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    info = {"load_s": time.perf_counter() - t, "version": llama_cpp.__version__, "weight_bytes": path.stat().st_size}
    ctx, n_vocab = llm.ctx, llm.n_vocab()
    batch = llama_cpp.llama_batch_init(len(prompt), 0, 1)
    weakref.finalize(llm, llama_cpp.llama_batch_free, batch)

    def decode(tokens: list[int], pos0: int) -> int:
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run() -> dict:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        tok = decode(prompt, 0)
        t1 = time.perf_counter()
        for i in range(new):
            tok = decode([tok], len(prompt) + i)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": new, "decode_tokens_per_s": new / (t2 - t1)}

    run.llm = llm  # type: ignore[attr-defined]  # alive as long as the runner
    return run, info


def ours_runner(rt, images: list[str], new: int, mode: str) -> Callable[[], dict]:
    """As genai_runner, one report through the runtime `rt` (an EchoRuntime whose EOS never comes)
    in `mode`, decode phase only; successive calls take the images in turn."""
    count = iter(range(1 << 30))

    def run() -> dict:
        r = rt.generate(images[next(count) % len(images)], max_new_tokens=new, mode=mode)[0]
        if not r.ok:
            raise RuntimeError(f"{mode}: {r.error}")
        dec = r.timings["decode"] - r.timings["prefill"]
        return {"prefill_s": r.timings["prefill"], "decode_s": dec, "new_tokens": len(r.tokens),
                "decode_tokens_per_s": len(r.tokens) / dec, "forward_passes": r.forward_passes, "stop": r.stop}

    return run


def _runs(run: Callable[[], dict], repeats: int) -> dict:
    return _median_run([run() for _ in range(repeats + 1)][1:])  # the first is a warm-up


def probe_genai(path: Path, prompt: list[int], new: int, repeats: int) -> dict:
    run, info = genai_runner(path, prompt, new)
    return {**_runs(run, repeats), **info, "rss_mb": status_mb("VmRSS"), "peak_rss_mb": status_mb("VmHWM")}


def probe_llama(path: Path, prompt: list[int], new: int, repeats: int, threads: int) -> dict:
    run, info = llama_runner(path, prompt, new, threads)
    return {**_runs(run, repeats), **info, "rss_mb": status_mb("VmRSS"), "peak_rss_mb": status_mb("VmHWM")}


def probe_pair(specs: list[tuple[str, str, Path, str]], prompt: list[int], images: list[str], new: int,
               rounds: int, threads: int) -> dict:
    """Two engines (kind, precision, path, our loop) loaded in one process and run in turn, `rounds`
    times after a warm-up of each: their tokens/s run by run, each pair taken in the same seconds of
    the shared machine (whose speed drifts by 10-20% over minutes: engines timed in separate
    processes minutes apart differ by that much on the same files)."""
    from runtime.engine import EchoRuntime

    runners = []
    for kind, prec, path, mode in specs:
        if kind == "ours":
            rt = EchoRuntime(path, precision=prec, batch_size=1, threads=threads, mode=mode)
            rt.tokenizer.eos_id = -1  # no id: every report runs to `new` tokens, as the peers'
            runners.append(ours_runner(rt, images, new, mode))
        elif kind == "onnxruntime-genai":
            runners.append(genai_runner(path, prompt, new)[0])
        else:
            runners.append(llama_runner(path, prompt, new, threads)[0])
    tps: list[list[float]] = [[] for _ in runners]
    for rnd in range(rounds + 1):  # round 0: the warm-up; every other round in reverse order
        for i in (range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))):
            tok_s = runners[i]()["decode_tokens_per_s"]
            if rnd:
                tps[i].append(tok_s)
    return {"engines": [list(map(str, sp)) for sp in specs], "tokens_per_s": tps}


def probe_ours(engine: Path, precision: str, images: list[str], new: int, repeats: int, threads: int,
               pass_repeats: int) -> dict:
    """The runtime's one-step (fused block_step) and AR (ar_step) loops on one folder, decode phase
    only (tokens / seconds after the prefill), then one ar_step and one block_step session run timed
    alone (benchmarks/ideal.py)."""
    from runtime.engine import EchoRuntime

    t = time.perf_counter()
    rt = EchoRuntime(engine, precision=precision, batch_size=1, threads=threads, mode="fused")
    load = time.perf_counter() - t
    rt.tokenizer.eos_id = -1  # no id: every report runs to `new` tokens, as the peers' (forced length)
    res: dict[str, Any] = {"load_s": load}
    for mode in ("fused", "ar"):
        res[mode] = {**_runs(ours_runner(rt, images, new, mode), repeats), "rss_mb": status_mb("VmRSS")}
    res["peak_rss_mb"] = status_mb("VmHWM")
    m = rt.manifest
    B = m.block_size
    res["block_size"] = B
    res["weight_bytes"] = sum(f.stat().st_size for f in engine.iterdir()
                              if f.name == f"weights.{precision}.bin" or (f.suffix == ".onnx" and f".{precision}." in f.name
                                                                           and f.name.split(".")[0] in ("vision_prefill", "block_step", "ar_step", "ar_step_inplace", "block_step_inplace")))
    del rt
    import gc

    gc.collect()
    from benchmarks.ideal import ort_pass_times

    pt = ort_pass_times(engine, precision, [1, 2 * B], images[0], threads, repeats=pass_repeats)
    res["t_ar_step_ms"], res["t_block_step_ms"] = 1e3 * pt["t"][1], 1e3 * pt["t"][2 * B]
    res["ar_role"] = pt["ar_role"]  # the steps the runtime ran (the in-place ones on the CPU)
    res["block_role"] = pt["block_role"]
    res["pass_cache_len"] = pt["cache_len"]
    return res


# ----------------------------------------------------------------------------- prepare / run
def _rung(size: str):
    from benchmarks.scale import RUNGS

    name = f"qwen2.5-{size}"
    if name not in RUNGS:
        raise SystemExit(f"--size {size}: no scale rung {name}; choose from {[r[8:] for r in RUNGS if r.startswith('qwen2.5-')]}")
    return RUNGS[name]


def prepare(size: str, work: Path, threads: int, install: bool, precisions: tuple[str, ...] = OUR_PRECISIONS,
            verify_n: int = 1) -> dict:
    """Everything `run` times: our engine (fp32, int8w, int4 with the lm_head quantised, AR graphs),
    the HF decoder folder, the genai models and the GGUFs; returns what was skipped and why."""
    from benchmarks import scale

    rung = _rung(size)
    root = work / rung.name
    root.mkdir(parents=True, exist_ok=True)
    skipped = {k: v for k, v in missing_peers().items() if v}
    if skipped and install:
        why = install_peers()
        skipped = {k: v for k, v in missing_peers().items() if v}
        if why:
            skipped = {k: f"{v} ({why})" for k, v in skipped.items()}
    data = scale.make_data(work)
    dcd, ar = scale.make_checkpoints(rung, 8, data, root)
    engine = root / "engine"
    if not (engine / "manifest.json").is_file():
        integer = [p for p in precisions if p != "fp32"]  # ours here are int4, int8w, int8dyn: each takes lm_head
        opts = [f"{p}.lm_head=true" for p in integer] + (["int4.method=rtn"] if "int4" in integer else [])  # lm_head too, as the peers
        cmd = [sys.executable, "-m", "echo_export.cli", "build", "--ckpt", str(dcd), "--ar-ckpt", str(ar), "--out", str(engine),
               "--precision", ",".join(precisions), *[a for o in opts for a in ("--precision-opt", o)], "--batch-sizes", "1",
               "--verify-n", str(verify_n), "--calib-size", "1", "--max-new-tokens", str(NEW_TOKENS), "--data", str(data),
               "--force", "--summary-json", str(root / "build.json")]
        print("[peers] $ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    hf = root / "hf-qwen2"
    need_hf = "onnxruntime-genai" not in skipped and any(not (root / f"genai-{p}" / "genai_config.json").is_file() for p in GENAI_PRECISIONS)
    need_hf |= "llama.cpp" not in skipped and not (root / "model-f32.gguf").is_file()
    if need_hf and not (hf / "model.safetensors").is_file():
        write_hf_decoder(dcd, hf)
    if "onnxruntime-genai" not in skipped:
        for p in GENAI_PRECISIONS:
            build_genai(hf, root / f"genai-{p}", p, threads)
    if "llama.cpp" not in skipped:
        script, why = gguf_converter(work)
        if why:
            skipped["llama.cpp"] = why
        else:
            f32 = convert_gguf(hf, root / "model-f32.gguf", script, threads)
            for name, ftype in GGUF_TYPES.items():
                if ftype is not None:
                    quantize_gguf(f32, root / f"model-{name}.gguf", ftype, threads)
    (root / "skipped.json").write_text(json.dumps(skipped, indent=2))
    return skipped


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_flags() -> list[str]:
    import re

    text = Path("/proc/cpuinfo").read_text()
    return sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx_vnni|vnni|avx2|amx[a-z_0-9]*)\b", text)))


def _median_round(rounds: list[dict], kind: str) -> dict:
    """The round of median decode speed (ours: of the one-step loop, its AR loop's median taken apart),
    with every round's tokens/s kept; the per-pass times are medians over the rounds."""
    if kind != "ours":
        med = _median_run(rounds)
        med["runs_tokens_per_s"] = [x for r in rounds for x in r["runs_tokens_per_s"]]
        return {**med, "rounds": len(rounds)}
    out = dict(rounds[0])
    for mode in ("fused", "ar"):
        m = _median_run([r[mode] for r in rounds])
        m["runs_tokens_per_s"] = [x for r in rounds for x in r[mode]["runs_tokens_per_s"]]
        out[mode] = m
    for k in ("t_ar_step_ms", "t_block_step_ms"):
        out[k] = statistics.median(r[k] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def run(size: str, work: Path, out: Path, threads: int, repeats: int, pass_repeats: int, rounds: int = 3,
        probe_timeout: int = 600, pair_rounds: int = 6) -> dict:
    """Every engine of the rung in its own subprocess, one after another; the table and plot."""
    from echo_train.stages.common import load_split

    rung = _rung(size)
    root = work / rung.name
    engine = root / "engine"
    man = json.loads((engine / "manifest.json").read_text())
    skipped = json.loads((root / "skipped.json").read_text()) if (root / "skipped.json").is_file() else {}
    skipped.update({k: v for k, v in missing_peers().items() if v})
    images = [s.image_paths[0] for s in load_split(work / "data", "test", repeats + 1)]
    # the peers' context: as many token ids as our prefix (image tokens + prompt), drawn from the tokenizer's ids
    prefix_len = int(man.get("prefix_len") or int(man["capacity"]) - NEW_TOKENS + 1)
    n_ids = json.loads((root / "hf-qwen2" / "tokenizer.json").read_text()) if (root / "hf-qwen2" / "tokenizer.json").is_file() else None
    n_vocab = len(n_ids["model"]["vocab"]) if n_ids else 1000
    prompt = np.random.default_rng(0).integers(3, n_vocab, prefix_len).tolist()
    cases = [("ours", p, engine) for p in OUR_PRECISIONS if f"ar_step.{p}.b1.onnx" in os.listdir(engine)]
    if "onnxruntime-genai" not in skipped:
        cases += [("onnxruntime-genai", p, root / f"genai-{p}") for p in GENAI_PRECISIONS if (root / f"genai-{p}").is_dir()]
    if "llama.cpp" not in skipped:
        cases += [("llama.cpp", p, root / f"model-{p}.gguf") for p in GGUF_TYPES if (root / f"model-{p}.gguf").is_file()]
    meta = {"size": size, "rung": rung.name, "note": rung.note, "threads": threads, "repeats": repeats, "rounds": rounds,
            "new_tokens": NEW_TOKENS,
            "context_tokens": prefix_len, "loadavg_before": _loadavg(), "cpu_flags": _cpu_flags(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "skipped": skipped,
            "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:])}
    from benchmarks.sysinfo import library_versions, machine_info

    meta["machine"], meta["versions"] = machine_info(), library_versions()
    # rounds: every engine once per round, so that a change of the shared machine's load hits all alike
    by_case: dict[tuple[str, str], list[dict]] = {(k, p): [] for k, p, _ in cases}
    failed: dict[tuple[str, str], str] = {}
    for rnd in range(rounds):
        # every other round in reverse order: a drift of the shared machine's speed within a round
        # then favours no engine by its place in the order
        for kind, prec, path in (cases if rnd % 2 == 0 else cases[::-1]):
            if (kind, prec) in failed:
                continue
            f = root / f"probe-{kind}-{prec}.r{rnd}.json"
            cmd = [sys.executable, "-m", "benchmarks.peers", "probe", kind, str(path), prec, "--out", str(f),
                   "--threads", str(threads), "--repeats", str(repeats), "--pass-repeats", str(pass_repeats),
                   "--prompt-len", str(prefix_len), "--vocab", str(n_vocab), *(["--images", *images] if kind == "ours" else [])]
            print(f"[peers] round {rnd + 1}/{rounds}: {kind} {prec} (load {_loadavg()})", flush=True)
            try:
                p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=probe_timeout)
            except subprocess.TimeoutExpired:
                failed[(kind, prec)] = f"probe timed out after {probe_timeout} s (load average {_loadavg()})"
                continue
            if p.returncode != 0:
                failed[(kind, prec)] = f"probe exit {p.returncode}"
                continue
            by_case[(kind, prec)].append({**json.loads(f.read_text()), "loadavg_after": _loadavg()})
    rows = _rows_of(cases, by_case, failed)
    if pair_rounds:
        meta["pairs"] = _run_pairs(_goal_pairs(rows, cases), root, threads, pair_rounds, prefix_len, n_vocab, images,
                                   probe_timeout)
    meta["loadavg_after"] = _loadavg()
    out.mkdir(parents=True, exist_ok=True)
    res = {"meta": meta, "rows": rows}
    (out / f"{rung.name}.json").write_text(json.dumps(res, indent=2))
    return render(out / f"{rung.name}.json")


def _rows_of(cases: list, by_case: dict, failed: dict) -> list[dict]:
    rows = []
    for kind, prec, _ in cases:
        if (kind, prec) in failed:
            rows.append({"engine": kind, "precision": prec, "failed": failed[(kind, prec)]})
        else:
            rows.append({"engine": kind, "precision": prec, **_median_round(by_case[(kind, prec)], kind)})
    return rows


def _goal_pairs(rows: list[dict], cases: list) -> dict[str, list[tuple[str, str, Path, str]]]:
    """Each goal's two engines (kind, precision, path, our loop) by the separate-process medians: per
    class our fastest AR against the class's fastest peer; our fastest one-step loop against the
    fastest peer of all."""
    path = {(k, p): x for k, p, x in cases}
    ok = [r for r in rows if "failed" not in r]
    peers = [r for r in ok if r["engine"] != "ours"]
    ours = [r for r in ok if r["engine"] == "ours"]
    spec = lambda r, mode="ar": (r["engine"], r["precision"], path[(r["engine"], r["precision"])], mode)  # noqa: E731
    out = {}
    for cls in ("fp32", "8-bit", "4-bit"):
        ps = [r for r in peers if CLASS_OF[r["precision"]] == cls]
        os_ = [r for r in ours if CLASS_OF[r["precision"]] == cls]
        if ps and os_:
            out[cls] = [spec(max(os_, key=lambda r: r["ar"]["decode_tokens_per_s"])),
                        spec(max(ps, key=lambda r: r["decode_tokens_per_s"]))]
    if ours and peers:
        out["one-step"] = [spec(max(ours, key=lambda r: r["fused"]["decode_tokens_per_s"]), "fused"),
                           spec(max(peers, key=lambda r: r["decode_tokens_per_s"]))]
    return out


def _run_pairs(pairs: dict, root: Path, threads: int, rounds: int, prefix_len: int, n_vocab: int,
               images: list[str], timeout: int) -> dict:
    """probe_pair for every goal, each in its own process: {goal: engines, tokens/s, ratios}."""
    out = {}
    for goal, specs in pairs.items():
        f = root / f"pair-{goal}.json"
        cmd = [sys.executable, "-m", "benchmarks.peers", "pair", "--out", str(f), "--threads", str(threads),
               "--rounds", str(rounds), "--prompt-len", str(prefix_len), "--vocab", str(n_vocab), "--images", *images,
               *(x for sp in specs for x in ("--engine", ",".join(map(str, sp))))]
        print(f"[peers] pair {goal}: {specs[0][:2]} against {specs[1][:2]}, {rounds} runs each (load {_loadavg()})",
              flush=True)
        try:
            p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=timeout)
        except subprocess.TimeoutExpired:
            out[goal] = {"failed": f"timed out after {timeout} s"}
            continue
        if p.returncode != 0:
            out[goal] = {"failed": f"exit {p.returncode}"}
            continue
        r = json.loads(f.read_text())
        r["ratios"] = [a / b for a, b in zip(*r["tokens_per_s"])]
        out[goal] = r
    return out


def render(json_path: Path) -> dict:
    """The table (.md) and plot (.png) beside a run's JSON, from its rows: no engine is run again."""
    res = json.loads(Path(json_path).read_text())
    Path(json_path).with_suffix(".md").write_text(markdown(res))
    plot(res, Path(json_path).with_suffix(".png"))
    print(markdown(res))
    return res


# ----------------------------------------------------------------------------- table and plot
def table_rows(res: dict) -> list[dict]:
    """One row per engine and decode loop: tokens/s, ms per token, per-pass ms, RSS, weight bytes."""
    out = []
    for r in res["rows"]:
        if "failed" in r:
            out.append({"engine": r["engine"], "precision": r["precision"], "failed": r["failed"]})
            continue
        if r["engine"] == "ours":
            for mode, label, pass_ms in (("fused", f"this runtime, one-step {r.get('block_role', 'block_step')} (B={r['block_size']})", r["t_block_step_ms"]),
                                         ("ar", f"this runtime, AR {r.get('ar_role', 'ar_step')}", r["t_ar_step_ms"])):
                x = r[mode]
                out.append({"engine": label, "loop": mode, "precision": r["precision"], "class": CLASS_OF[r["precision"]],
                            "tps": x["decode_tokens_per_s"], "runs": x["runs_tokens_per_s"], "tokens": x["new_tokens"],
                            "passes": x.get("forward_passes"), "pass_ms": pass_ms, "rss_mb": x["rss_mb"],
                            "weight_bytes": r["weight_bytes"], "ours": True})
        else:
            label = f"{r['engine']} {r.get('version', '')}".strip()
            out.append({"engine": label, "loop": "ar", "precision": r["precision"], "class": CLASS_OF[r["precision"]],
                        "tps": r["decode_tokens_per_s"], "runs": r["runs_tokens_per_s"], "tokens": r["new_tokens"],
                        "passes": r["new_tokens"], "pass_ms": 1e3 * r["decode_s"] / max(r["new_tokens"], 1),
                        "rss_mb": r["rss_mb"], "weight_bytes": r["weight_bytes"], "ours": False})
    return out


def verdicts(rows: list[dict]) -> dict:
    """Per precision class: our AR against the best peer of the class; one-step against the best AR peer."""
    ok = [r for r in rows if "failed" not in r]
    peers = [r for r in ok if not r["ours"]]
    best_peer = max(peers, key=lambda r: r["tps"]) if peers else None
    out: dict[str, Any] = {"best_peer": best_peer and {k: best_peer[k] for k in ("engine", "precision", "tps")}, "classes": {}}
    for cls in ("fp32", "8-bit", "4-bit"):
        ours_ar = [r for r in ok if r["ours"] and r["loop"] == "ar" and r["class"] == cls]
        ours_fused = [r for r in ok if r["ours"] and r["loop"] == "fused" and r["class"] == cls]
        ps = [r for r in peers if r["class"] == cls]
        if not ps or not ours_ar:
            continue
        bp = max(ps, key=lambda r: r["tps"])
        ar = max(ours_ar, key=lambda r: r["tps"])  # our fastest engine of the class (8-bit: int8w or int8dyn)
        fused = max(ours_fused, key=lambda r: r["tps"]) if ours_fused else None
        out["classes"][cls] = {"best_peer": f"{bp['engine']} {bp['precision']}", "best_peer_tps": bp["tps"],
                               "our_ar_precision": ar["precision"], "our_ar_tps": ar["tps"], "ar_over_peer": ar["tps"] / bp["tps"],
                               "ar_over_peer_by_round": paired_ratios(ar, bp),
                               "one_step_over_peer": fused["tps"] / bp["tps"] if fused else None}
    fused = [r for r in ok if r["ours"] and r["loop"] == "fused"]
    if fused and best_peer:
        bf = max(fused, key=lambda r: r["tps"])
        out["one_step_best"] = {"precision": bf["precision"], "tps": bf["tps"], "over_best_peer": bf["tps"] / best_peer["tps"],
                                "over_best_peer_by_round": paired_ratios(bf, best_peer)}
    return out


def paired_ratios(a: dict, b: dict) -> Optional[list[float]]:
    """a's tokens/s over b's, run by run (the same round: the same state of the shared machine), or
    None where their runs do not pair up."""
    if not a.get("runs") or len(a["runs"]) != len(b.get("runs") or []):
        return None
    return [x / y for x, y in zip(a["runs"], b["runs"])]


def _by_round_text(ratios: Optional[list[float]]) -> str:
    if not ratios:
        return ""
    return f" (run by run: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}x)"


def _pair_lines(pairs: dict) -> list[str]:
    """The goals again, each pair of engines in one process, in turn (probe_pair)."""
    if not pairs:
        return []
    lines = ["", "Each goal's two engines again in one process, in turn (every other round reversed), so that "
             "each pair of runs meets the shared machine in the same state:", ""]
    goal = {"one-step": 2.5}
    for name, p in pairs.items():
        if "failed" in p:
            lines.append(f"- {name}: failed ({p['failed']})")
            continue
        a, b = (" ".join(e[:2]) + (" one-step" if e[0] == "ours" and e[3] == "fused" else "") for e in p["engines"])
        med = statistics.median(p["ratios"])
        lines.append(f"- {name}: {a} {statistics.median(p['tokens_per_s'][0]):.1f} vs {b} "
                     f"{statistics.median(p['tokens_per_s'][1]):.1f} tok/s (medians of {len(p['ratios'])} runs): "
                     f"**{med:.2f}x** (goal >= {goal.get(name, 1.0):.2f}x; run by run "
                     f"{', '.join(f'{x:.2f}' for x in p['ratios'])})")
    return lines


def markdown(res: dict) -> str:
    m = res["meta"]
    rows = table_rows(res)
    ok = sorted([r for r in rows if "failed" not in r], key=lambda r: -r["tps"])
    v = verdicts(rows)
    lines = [f"# Peer AR engines at the {m['rung']} shape ({m['note']})", "",
             f"Random weights at the real shapes; context {m['context_tokens']} tokens (our prefix: image tokens + prompt; "
             f"the peers: as many text token ids), {m['new_tokens']} new tokens greedy, batch 1, {m['threads']} threads, "
             f"{m.get('rounds', 1)} rounds, each running every engine once in its own process ({m['repeats']} timed "
             f"decode(s) after one warm-up; every other round in reverse order); the median round per engine, and "
             f"in the goals each ratio also run by run (same round). **Decode phase only** (tokens / seconds after the prefill): the peers are "
             f"text-only, ours carries an image prefix, so prefill is not compared.", "",
             "| engine | precision | decode tok/s | ms / token | per pass ms | tokens | RSS | weight bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ok:
        pp = f"{r['pass_ms']:.1f}" + (" (AR step, T=1)" if r["ours"] and r["loop"] == "ar" else
                                       f" (one-step pass, T=16)" if r["ours"] else "")
        lines.append(f"| {'**' + r['engine'] + '**' if r['ours'] else r['engine']} | {r['precision']} | {r['tps']:.1f} | "
                     f"{1e3 / r['tps']:.1f} | {pp} | {r['tokens']} | {r['rss_mb'] / 1024:.2f} GB | {r['weight_bytes'] / 1e6:.0f} MB |")
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['engine']} | {r['precision']} | failed: {r['failed']} | | | | | |")
    lines += ["", "## Goals", ""]
    for cls, c in v["classes"].items():
        lines.append(f"- {cls}: our AR ({c.get('our_ar_precision', '?')}) {c['our_ar_tps']:.1f} tok/s vs best peer {c['best_peer']} {c['best_peer_tps']:.1f} "
                     f"-> **{c['ar_over_peer']:.2f}x** (goal >= 1.00x){_by_round_text(c.get('ar_over_peer_by_round'))}"
                     + (f"; one-step {c['one_step_over_peer']:.2f}x" if c["one_step_over_peer"] else ""))
    if v.get("one_step_best"):
        b = v["one_step_best"]
        lines.append(f"- one-step DCD ({b['precision']}) {b['tps']:.1f} tok/s vs the best AR peer "
                     f"({v['best_peer']['engine']} {v['best_peer']['precision']}, {v['best_peer']['tps']:.1f}) -> "
                     f"**{b['over_best_peer']:.2f}x** (goal >= 2.5x){_by_round_text(b.get('over_best_peer_by_round'))}")
    lines += _pair_lines(m.get("pairs") or {})
    if m["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {k}: {why}" for k, why in m["skipped"].items()]
    lines += ["", f"Per pass: ours, one `ar_step` (1 token) / `block_step` (2B = 16 tokens, B new) session run timed alone "
              "against a cache of prefix + 64 (benchmarks/ideal.py); the peers, decode seconds / tokens (their loop, "
              "Python included, as in our loop's tokens/s). RSS: the engine's process after its runs (ours: both loops' "
              "graphs loaded, sharing one copy of the weights per precision). Weight bytes: the files the engine loads "
              "(ours: weights.<precision>.bin + the graphs, the ViT-B/16 image tower and projector included; genai: "
              "model.onnx + data; llama.cpp: the GGUF).", "",
              f"Machine: {m['machine'].get('cpu', '?')}, CPU flags {' '.join(m['cpu_flags'])}; load average "
              f"{m['loadavg_before']} before, {m['loadavg_after']} after (shared machine). {m['date']}. "
              f"Command: `{m['command']}`."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = sorted([r for r in table_rows(res) if "failed" not in r], key=lambda r: r["tps"])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    colors = ["tab:red" if r["ours"] and r["loop"] == "fused" else "tab:orange" if r["ours"] else "tab:gray" for r in rows]
    ax.barh(range(len(rows)), [r["tps"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), [f"{r['engine']} {r['precision']}" for r in rows], fontsize=8)
    for i, r in enumerate(rows):
        ax.text(r["tps"], i, f" {r['tps']:.1f}", va="center", fontsize=8)
    m = res["meta"]
    ax.set_xlabel(f"decode tokens/s (batch 1, {m['threads']} threads, context {m['context_tokens']}, {m['new_tokens']} new)")
    ax.set_title(f"{m['rung']}: this runtime vs peer AR engines (decode phase only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "run"):
        s = sub.add_parser(name)
        s.add_argument("--size", default="0.5b", help="the scale rung qwen2.5-<size>: 0.5b, 1.5b")
        s.add_argument("--work", type=Path, default=WORK)
        s.add_argument("--threads", type=int, default=2)
    sub.choices["prepare"].add_argument("--install", action="store_true", help="pip-install the peers extra when missing")
    sub.choices["prepare"].add_argument("--verify-n", type=int, default=1, help="our build's verification images")
    sub.choices["run"].add_argument("--out", type=Path, default=RESULTS)
    sub.choices["run"].add_argument("--rounds", type=int, default=3, help="every engine once per round, in its own process")
    sub.choices["run"].add_argument("--repeats", type=int, default=1, help="timed decodes per engine and round (after one warm-up)")
    sub.choices["run"].add_argument("--pass-repeats", type=int, default=20)
    sub.choices["run"].add_argument("--probe-timeout", type=int, default=600, help="seconds one engine's probe may take")
    sub.choices["run"].add_argument("--pair-rounds", type=int, default=6,
                                    help="then each goal's two engines in one process, in turn, this many runs each "
                                         "(0: not)")
    rd = sub.add_parser("render", help="rewrite a run's table and plot from its JSON (no engine runs)")
    rd.add_argument("json", type=Path, help="e.g. benchmarks/results/peers/qwen2.5-0.5b.json")
    pr = sub.add_parser("probe", help=argparse.SUPPRESS)
    pr.add_argument("kind", choices=["ours", "onnxruntime-genai", "llama.cpp"])
    pr.add_argument("path", type=Path)
    pr.add_argument("precision")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--threads", type=int, default=2)
    pr.add_argument("--repeats", type=int, default=3)
    pr.add_argument("--pass-repeats", type=int, default=20)
    pr.add_argument("--prompt-len", type=int, default=224)
    pr.add_argument("--vocab", type=int, default=1000)
    pr.add_argument("--images", nargs="*", default=[])
    pa = sub.add_parser("pair", help=argparse.SUPPRESS)
    pa.add_argument("--engine", action="append", required=True, help="kind,precision,path,loop (twice)")
    pa.add_argument("--out", type=Path, required=True)
    pa.add_argument("--threads", type=int, default=2)
    pa.add_argument("--rounds", type=int, default=6)
    pa.add_argument("--prompt-len", type=int, default=224)
    pa.add_argument("--vocab", type=int, default=1000)
    pa.add_argument("--images", nargs="*", default=[])
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        skipped = prepare(a.size, a.work, a.threads, a.install, verify_n=a.verify_n)
        for k, why in skipped.items():
            print(f"[peers] skipped {k}: {why}")
    elif a.cmd == "run":
        run(a.size, a.work, a.out, a.threads, a.repeats, a.pass_repeats, a.rounds, a.probe_timeout, a.pair_rounds)
    elif a.cmd == "render":
        render(a.json)
    elif a.cmd == "pair":
        prompt = np.random.default_rng(0).integers(3, a.vocab, a.prompt_len).tolist()
        specs = [(k, p, Path(x), mode) for k, p, x, mode in (e.split(",") for e in a.engine)]
        a.out.write_text(json.dumps(probe_pair(specs, prompt, a.images, NEW_TOKENS, a.rounds, a.threads)))
    else:
        prompt = np.random.default_rng(0).integers(3, a.vocab, a.prompt_len).tolist()
        if a.kind == "ours":
            res = probe_ours(a.path, a.precision, a.images, NEW_TOKENS, a.repeats, a.threads, a.pass_repeats)
        elif a.kind == "onnxruntime-genai":
            res = probe_genai(a.path, prompt, NEW_TOKENS, a.repeats)
        else:
            res = probe_llama(a.path, prompt, NEW_TOKENS, a.repeats, a.threads)
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
