"""The ideal one-step speed-up on this machine: B x t(1 token) / t(2B tokens).

One fused one-step pass writes B tokens with 2B inputs; one AR pass writes 1 token with 1
input. If nothing but forward passes cost time, one-step decoding would be this many times
faster than AR. Measured per engine, in the same process as the achieved speed-up, so the
gap between the two is the decoders' own overhead (plus report-length differences).

PyTorch: a forward of T = 1 and T = 2B tokens against a real KV cache of realistic length.
onnxruntime: `ar_step` and `block_step` session runs (IO-bound buffers, as the runtime does)
with a real prefix cache from `vision_prefill` and a realistic `past_len`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from echo_export.timing import alternating_run_medians

MID_REPORT_TOKENS = 64  # cache length = prefix + this: the middle of a typical report


def torch_pass_times(model, tok, token_counts: Sequence[int], image_path: Optional[str] = None, device: str = "cpu",
                     repeats: int = 30, bf16: bool = False) -> dict:
    """Seconds of one forward of T tokens (each T in token_counts) against a cache of P + 64 tokens."""
    import contextlib

    import torch
    from echo_train.decoding.common import prefix_ids_tensor
    from runtime.preprocess import preprocess_image

    S = model.cfg.vision.image_size
    if image_path:
        px = torch.from_numpy(preprocess_image(image_path, S, model.cfg.vision.preprocess))[None].to(device)
    else:
        px = torch.zeros(1, 1, S, S, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.startswith("cuda")) else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), ctx:
        prefix = prefix_ids_tensor(tok, model, 1, device)
        ids = torch.randint(5, model.cfg.lm.vocab_size, (1, MID_REPORT_TOKENS), generator=g).to(device)
        embeds = torch.cat([model.embed_prefix(px, prefix), model.embed_tokens(ids)], 1)
        n = embeds.shape[1]
        pos = torch.arange(n, device=device)[None]
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None]
        _, past = model(embeds, pos, mask)  # a real cache of realistic length
        fns = {}
        for T in token_counts:
            x = model.embed_tokens(torch.randint(5, model.cfg.lm.vocab_size, (1, T), generator=g).to(device))
            p = torch.arange(n, n + T, device=device)[None]
            m = torch.ones(1, T, n + T, dtype=torch.bool, device=device)

            def run(x=x, p=p, m=m):
                model(x, p, m, past)
                sync()

            fns[int(T)] = run
        return {"cache_len": n, "t": alternating_run_medians(fns, repeats), "timer": "forward against a KV cache"}


def ort_pass_times(engine_dir: str | Path, precision: str, token_counts: Sequence[int], image_path: Optional[str],
                   threads: Optional[int], repeats: int = 50, providers: Optional[list[str]] = None,
                   inplace: bool = True) -> dict:
    """Seconds inside one `ar_step` (T=1) and one `block_step` (T=2B) session run, batch 1. The
    steps are the ones the runtime runs on the CPU: their in-place forms where the folder has them
    (`inplace`)."""
    from echo_export.decode_loop import shared_weights_of
    from runtime import graph_io as gio
    from runtime.errors import ManifestError
    from runtime.manifest import load_manifest, resolve_graph
    from runtime.ort_backend import OrtGraph
    from runtime.preprocess import preprocess_image, preprocess_mode_of
    from runtime.text import ReportTokenizer

    d = Path(engine_dir)
    m = load_manifest(d)
    tok = ReportTokenizer.from_file(d / "tokenizer.json", m.prompt_template)  # the engine's own prompt
    B = m.block_size
    graphs = {}
    weights = {}  # precision -> SharedWeights: the graphs hold the weights once, as in the runtime

    def graph(role, prec):
        key = (role, prec)
        if key not in graphs:
            try:
                fname, fprec = resolve_graph(m, role, prec, 1), prec
            except Exception:
                fname, fprec = resolve_graph(m, role, "fp32", 1), "fp32"  # prefill graphs are fp32 only
            if fprec not in weights:
                weights[fprec] = shared_weights_of(d, fprec)
            graphs[key] = OrtGraph(d / fname, threads=threads, providers=providers, shared_weights=weights[fprec])
        return graphs[key]

    pre = graph(gio.VISION_PREFILL, precision)
    L, _, kvH, npre, dh = pre.shape("present_key")
    step_roles = {2 * B: gio.BLOCK_STEP, 1: gio.AR_STEP}
    if inplace and not providers:  # onnxruntime's CPU (the default providers here): the in-place forms
        for role, standard in gio.CPU_ONLY_ROLES.items():
            try:
                resolve_graph(m, role, precision, 1)
                step_roles = {t: role if r == standard else r for t, r in step_roles.items()}
            except ManifestError:  # a folder without it: the standard step
                pass
    ar_role = step_roles[1]
    out = {"cache_len": None, "t": {}, "timer": "session.run_with_iobinding", "ar_role": ar_role,
           "block_role": step_roles[2 * B]}
    S = m.image_size
    px = (preprocess_image(image_path, S, preprocess_mode_of(m.model_config)) if image_path else np.zeros((1, S, S), np.float32))[None].astype(np.float32)
    prefix = np.asarray(tok.prefix_ids(_n_image_tokens(m)), np.int64)[None]
    pk = np.zeros((L, 1, kvH, npre, dh), np.float32)
    pv = np.zeros_like(pk)
    pre.bind({"pixel_values": np.ascontiguousarray(px), "prefix_ids": prefix}, {"present_key": pk, "present_value": pv})
    pre.run()
    runs = {}
    for T in token_counts:
        role = step_roles.get(int(T))
        if role is None:
            continue
        g = graph(role, precision)
        inplace_graph = gio.is_inplace_cache(g.inputs)
        slots = g.shape("past_key.0")[2] if inplace_graph else g.shape("past_key")[3]
        CAP = slots - (gio.inplace_spare_slots(T) if inplace_graph else 0)  # what the loop may fill
        past = min(npre + MID_REPORT_TOKENS, CAP - T)
        ck = np.zeros((L, 1, kvH, slots, dh), np.float32)
        cv = np.zeros_like(ck)
        ck[:, :, :, :npre], cv[:, :, :, :npre] = pk, pv  # the real prefix cache
        rng = np.random.default_rng(0)
        ck[:, :, :, npre:past] = rng.standard_normal(ck[:, :, :, npre:past].shape) * pk.std()
        cv[:, :, :, npre:past] = rng.standard_normal(cv[:, :, :, npre:past].shape) * pv.std()
        ids = np.full((1, T), tok.mask_id, np.int64)
        pos = np.arange(past, past + T, dtype=np.int64)[None]
        keep = B if T > 1 else 1
        outs = {"tokens": np.zeros((1, keep), np.int64), "present_key": np.zeros((L, 1, kvH, keep, dh), np.float32)}
        outs["present_value"] = np.zeros_like(outs["present_key"])
        if "confidence" in g.outputs:
            outs["confidence"] = np.zeros((1, B), np.float32)
        spec = g.outputs.get("tokens")
        if spec and spec[1] is not None:
            outs["tokens"] = outs["tokens"].astype(spec[1])
        cache = {"past_key": ck, "past_value": cv}
        if inplace_graph:  # the step writes at slot `past` on every timed run: the same slot each time
            cache, more = gio.inplace_cache_bindings(ck, cv)
            outs = {**{k: v for k, v in outs.items() if not k.startswith("present_")}, **more}
        g.bind({"input_ids": ids, "position_ids": pos, "past_len": np.array([past], np.int64), **cache}, outs)
        runs[int(T)] = g.run
        out["cache_len"] = past
    out["t"] = alternating_run_medians(runs, repeats, timer=lambda run: run())  # OrtGraph.run returns session seconds
    return out


def _n_image_tokens(m) -> int:
    cfg = m.model_config or {}
    if "n_image_tokens" in cfg:
        return int(cfg["n_image_tokens"])
    v = cfg.get("vision") or {}
    return (int(v["image_size"]) // int(v["patch_size"])) ** 2


def ideal_speedups(times: dict[int, float], block_sizes: Sequence[int]) -> dict[int, float]:
    """B x t(1) / t(2B) for every B whose two timings exist."""
    out = {}
    for B in block_sizes:
        if 1 in times and 2 * B in times and times[2 * B] > 0:
            out[int(B)] = B * times[1] / times[2 * B]
    return out
