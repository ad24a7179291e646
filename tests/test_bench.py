"""echo-bench on tiny random checkpoints: the HF baseline, every requested cell, outputs, missing engines.

Speed is never asserted: only that timings exist and the ideal ratio is a positive number.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import make_tiny_model, make_tokenizer, write_tiny_dataset

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPORTS = [
    "FINDINGS: The heart size is normal. There is no pleural effusion. IMPRESSION: No acute process.",
    "FINDINGS: The cardiac silhouette is enlarged. There is a small left pleural effusion. IMPRESSION: Cardiomegaly.",
    "FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia.",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    from echo_train.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bench")
    tok = make_tokenizer()
    for name, stage, seed in (("ar", "ar", 1), ("base", "rad", 0), ("echo", "dcd", 2)):
        m = make_tiny_model(tok, stage=stage, block_size=8, seed=seed)
        m.cfg.max_response_tokens = MAX_NEW
        save_checkpoint(root / "runs" / name, m, tok)
    data = write_tiny_dataset(root / "data", 3, 4, REPORTS)
    # the onnxruntime cells run on a real engine folder: an exporter that fails here fails the tests
    from echo_export.build import BuildOptions, build

    build(BuildOptions(ckpt=root / "runs/echo", out=root / "engines/echo", precisions=["fp32"],
                       ar_ckpt=root / "runs/ar", capacity=96, calib_size=2, verify_n=2, data=data),
          log=lambda s: None)
    return root, tok, data, root / "engines/echo"


def _stop_at(model, tok, px, stops: list[int]) -> None:
    """Set the EOS row of the LM head so that greedy AR decoding of row r writes EOS as its token
    stops[r] and nothing earlier: its logit is solved, on the hidden states of the decode without it,
    to lie 2 below the step's best logit before stops[r] and 2 above it there. EOS is never an input
    before it is written, so those hidden states stay the same."""
    from echo_train.decoding import ar_generate
    from echo_train.stages.batches import build_ar_inputs

    raw = ar_generate(model, tok, px, MAX_NEW).raw
    prefix = torch.tensor(tok.prefix_ids(model.n_image_tokens))[None].expand(len(px), -1)
    inp = build_ar_inputs(model, {"pixel_values": px, "prefix_ids": prefix, "response_ids": raw,
                                  "response_mask": torch.ones_like(raw, dtype=torch.bool)})
    with torch.no_grad():
        h, _ = model.lm(inp.embeds, inp.position_ids, inp.mask)
        h = h[:, prefix.shape[1] - 1 :]  # h[:, t] predicts new token t
        best = model.lm.lm_head(h).max(-1).values
        rows = [(r, t) for r, k in enumerate(stops) for t in range(k + 1)]
        H = torch.stack([h[r, t] for r, t in rows]).double()
        want = torch.stack([best[r, t] + (2.0 if t == stops[r] else -2.0) for r, t in rows]).double()
        w = torch.linalg.lstsq(H, want[:, None], driver="gelsd").solution[:, 0]  # exact: fewer points than dims
        model.lm.lm_head.weight[tok.eos_id] = w.float()


def test_hf_generate_matches_ar_generate(bench_setup):
    from benchmarks.engines import hf_causal_lm, hf_generate
    from echo_train.decoding import ar_generate
    from echo_train.model.checkpoint import load_checkpoint

    root, _, _, _ = bench_setup
    model, tok = load_checkpoint(root / "runs/ar")
    g = torch.Generator().manual_seed(0)
    px = torch.randn(3, 1, 32, 32, generator=g)
    stops = [2, 6, 11]  # each row ends at its own step: generate() must stop (and pad) each row as we do
    _stop_at(model, tok, px, stops)
    ours = ar_generate(model, tok, px, MAX_NEW)
    assert [len(t) for t in ours.tokens] == stops and ours.forward_passes == max(stops) + 1
    assert all(tok.eos_id not in t for t in ours.tokens)
    hf = hf_causal_lm(model)
    theirs = hf_generate(hf, model, tok, px, MAX_NEW).tolist()
    assert [r[k] for r, k in zip(theirs, stops)] == [tok.eos_id] * 3  # the EOS itself, where ours stopped
    assert [tok.cut_at_eos(r) for r in theirs] == ours.tokens


def test_harness_writes_every_cell(bench_setup, tmp_path):
    from benchmarks.engines import Paths
    from benchmarks.harness import BenchConfig, run_benchmark

    root, _, data, _ = bench_setup
    out = tmp_path / "out"
    cfg = BenchConfig(
        data=str(data), split="test", n=3, methods=["ar", "teacher", "naive", "dcd"],
        engines="pytorch,ort-fp32,ort-fp16,trt-fp16,hf", block_sizes=[8, 16],
        paths=Paths(ar_ckpt=str(root / "runs/ar"), teacher_ckpt=str(root / "runs/base"),
                    dcd_ckpt=str(root / "runs/echo"), engine_dir=str(root / "engines/echo"),
                    naive_engine_dir=str(root / "engines/base")),
        repeats=1, warmup=1, threads=1, throughput_batch=2, throughput_n=2,
        metrics=["finding_f1", "bleu", "rouge", "validity"], n_boot=0, ideal_repeats=3, out=str(out),
        log=lambda s: None,
    )
    result, paths = run_benchmark(cfg)
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    saved = json.loads(paths["json"].read_text())
    cells = {(c["method"], c["engine"], c["block_size"]): c for c in saved["cells"]}
    # the int8 kernels onnxruntime runs on this CPU are part of the setup a result is read with
    from runtime.cpu_features import detect_cpu_features

    assert saved["machine"]["cpu_features"] == detect_cpu_features().to_dict()
    assert f"int8 kernels: {detect_cpu_features().int8_kind}" in paths["md"].read_text()
    # every requested cell is present: 4 methods (AR once) x 5 engines, block sizes 8 and 16
    assert len(cells) == 5 * (1 + 3 * 2)

    for m in ("ar", "teacher", "naive", "dcd"):
        c = cells[(m, "pytorch-cpu", None if m == "ar" else 8)]
        assert c["status"] == "ok", c["status"]
        assert c["latency_ms"]["p50"] > 0 and c["forward_passes_per_report"] >= 1 and c["tokens_per_s"] > 0
        assert c["throughput"]["reports_per_s"] > 0 and c["peak_rss_mb"] > 0
        q = c["quality"]
        assert isinstance(q["finding_f1"], float) and isinstance(q["bleu4"], float) and isinstance(q["rougeL"], float)
        assert q["semscore"].startswith("not computed")  # never another model under that name
        assert c["speedup_vs_ar"] > 0
    # the fused one-step decoders need blocks + 1 passes; the teacher more
    assert cells[("teacher", "pytorch-cpu", 8)]["forward_passes_per_report"] > cells[("dcd", "pytorch-cpu", 8)]["forward_passes_per_report"]
    # missing block-16 checkpoints / engines
    assert cells[("dcd", "pytorch-cpu", 16)]["status"] == f"not available: {root / 'runs/echo-b16'} missing"
    assert cells[("naive", "ort-fp32", 8)]["status"].startswith("not available: ")
    assert cells[("teacher", "ort-fp32", 8)]["status"].startswith("not available: ")
    assert cells[("dcd", "trt-fp16", 8)]["status"].startswith("not available: ")
    assert cells[("dcd", "hf-cpu", 8)]["status"].startswith("not available: ")
    assert cells[("ar", "hf-cpu", None)]["status"] == "ok"
    # the HF baseline runs the same AR weights greedily: same reports as our AR decoder
    assert cells[("ar", "hf-cpu", None)]["preds"] == cells[("ar", "pytorch-cpu", None)]["preds"]

    ideal = {r["engine"]: r for r in saved["ideal_speedup"]}
    assert ideal["pytorch-cpu"]["status"] == "ok"
    assert ideal["pytorch-cpu"]["ideal"]["8"] > 0 and ideal["pytorch-cpu"]["ideal"]["16"] > 0
    md = paths["md"].read_text()
    assert "ideal" in md and "DCD one-step" in md
    # the cells that cannot run are listed under the table, each reason once, never as table rows
    table = md[md.index("| method | B | engine | finding F1 | SemScore"):md.index("\n\n", md.index("| method | B"))]
    statuses = [row.split(" | ")[3] for row in table.splitlines()[2:]]  # the finding F1 column, or a status
    n_na = sum(c["status"].startswith("not available: ") for c in saved["cells"])
    assert len(statuses) == len(saved["cells"]) - n_na and "| AR | – | hf-cpu |" in table
    assert not any(st.startswith("not available") for st in statuses)
    assert f"Not available here ({n_na} of {len(saved['cells'])} cells)" in md
    assert md.count("transformers generate() decodes autoregressively only") == 1
    assert "teacher rows: steps = B, unmasking rule `dynamic-ltr`, threshold 0.85" in md  # how the teacher decoded
    # every non-AR cell carries its F1 difference from AR on the same studies (n_boot=0: no CI)
    for m in ("teacher", "naive", "dcd"):
        d = cells[(m, "pytorch-cpu", 8)]["finding_f1_vs_ar"]
        assert d["delta"] == pytest.approx(cells[(m, "pytorch-cpu", 8)]["quality"]["finding_f1"]
                                           - cells[("ar", "pytorch-cpu", None)]["quality"]["finding_f1"])
        assert d["ci95"] is None and d["ar_engine"] == "pytorch-cpu"
    assert "Finding F1 against AR" in md

    for m in ("ar", "dcd"):
        c = cells[(m, "ort-fp32", None if m == "ar" else 8)]
        assert c["status"] == "ok", c["status"]
        assert c["latency_ms"]["p50"] > 0
    assert cells[("dcd", "ort-fp16", 8)]["status"].startswith("not available: ")  # fp32-only folder
    # batch 2 was not built: the throughput says so instead of failing the cell
    assert cells[("dcd", "ort-fp32", 8)]["throughput"]["status"].startswith("not available: ")
    assert ideal["ort-fp32"]["status"] == "ok" and ideal["ort-fp32"]["ideal"]["8"] > 0
    # the decode phase alone (prefill left out) is timed for runtime cells and compared with the ideal
    dcd = cells[("dcd", "ort-fp32", 8)]
    assert 0 < dcd["prefill_ms_mean"] < dcd["latency_ms"]["mean"]
    assert dcd["decode_tokens_per_s"] > dcd["tokens_per_s"]
    assert ideal["ort-fp32"]["achieved_dcd_vs_ar_decode_only"]["8"] == pytest.approx(dcd["decode_speedup_vs_ar"])
    assert "decode only" in md
    # the passes timed inside the loops, beside the isolated t(1) / t(2B)
    loop = ideal["ort-fp32"]["in_loop_t_ms"]
    assert loop["1"] > 0 and loop["16"] > 0
    assert cells[("dcd", "ort-fp32", 8)]["finding_f1_vs_ar"]["ar_engine"] == "ort-fp32"
    ov = saved["runtime_overhead"]
    assert 0 <= ov["outside_session_of_decode"] <= 1
    # the engine decodes like the PyTorch reference
    assert cells[("dcd", "ort-fp32", 8)]["preds"] == cells[("dcd", "pytorch-cpu", 8)]["preds"]


def _cell(method: str, engine: str, B, status: str = "ok", f1=0.5, valid=0.9, ms: float = 10.0) -> dict:
    """A results.json cell as the harness writes it (only what the table and the plot read)."""
    c = {"method": method, "engine": engine, "block_size": B, "status": status}
    if status == "ok":
        c.update(quality={"finding_f1": f1, "semscore": "not computed", "bleu4": 0.2, "rougeL": 0.4,
                          "valid_sentence_rate": valid},
                 latency_ms={"p50": ms, "p95": ms, "mean": ms}, tokens_per_s=100.0, forward_passes_per_report=4.0,
                 tokens_per_forward=2.0, throughput={}, speedup_vs_ar=1.0, peak_rss_mb=100.0)
    return c


def _result(cells: list[dict]) -> dict:
    machine = {"date": "d", "cpu": "c", "cpus_usable": 2, "cpu_count": 2, "gpu": None, "libraries": {}, "python": "3"}
    config = {"data": "data/synth", "split": "test", "warmup": 1, "repeats": 1, "runtime_repeats": None,
              "throughput_batch": 2, "throughput_n": 2, "seed": 0, "n_boot": 0, "max_new_tokens": 16}
    return {"machine": machine, "config": config, "studies": {"n": 3}, "threads": {}, "cells": cells,
            "ideal_speedup": [], "runtime_overhead": {}, "command": "echo-bench", "wall_s": 1.0}


def test_markdown_lists_the_cells_that_cannot_run_once_under_the_table():
    from benchmarks.tables import results_markdown

    na = "not available: "
    cells = [_cell("ar", "pytorch-cpu", None), _cell("dcd", "pytorch-cpu", 8),
             _cell("dcd", "pytorch-cpu", 16, na + "runs/echo-b16 missing"),
             _cell("ar", "ort-fp32", None), _cell("teacher", "ort-fp32", 8, na + "one-step graphs only"),
             _cell("teacher", "ort-fp32", 16, na + "one-step graphs only"),
             _cell("dcd", "ort-fp32", 8, "failed: RuntimeError: boom"),
             _cell("dcd", "ort-fp32", 16, na + "engines/echo-b16 missing")]
    cells += [_cell(m, "trt-fp16", B, na + "no TensorRT") for m, B in (("ar", None), ("teacher", 8), ("dcd", 8))]
    md = results_markdown(_result(cells))
    table = md[md.index("| method | B | engine"):md.index("Not available here")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    # the cells that ran, and the one that failed (a failure is news, not a missing part), as rows
    assert [r.split(" | ")[:3] for r in rows] == [["| AR", "–", "pytorch-cpu"], ["| DCD one-step", "8", "pytorch-cpu"],
                                                   ["| AR", "–", "ort-fp32"], ["| DCD one-step", "8", "ort-fp32"]]
    assert "failed: RuntimeError: boom" in rows[3]
    listing = md[md.index("Not available here"):].split("\n\n")[:2]
    assert listing[0] == "Not available here (7 of 11 cells), one line per reason:"
    assert listing[1].splitlines() == [
        "- DCD one-step B=16 on pytorch-cpu: runs/echo-b16 missing",
        "- teacher (B steps) B=8, 16 on ort-fp32: one-step graphs only",
        "- DCD one-step B=16 on ort-fp32: engines/echo-b16 missing",
        "- every method on trt-fp16: no TensorRT",
    ]
    # nothing to list: no listing
    assert "Not available here" not in results_markdown(_result(cells[:2]))


def test_plot_shows_sentence_validity_beside_finding_f1():
    from benchmarks.plot import quality_vs_latency_figure

    cells = [_cell("ar", "pytorch-cpu", None, f1=0.52, valid=1.0, ms=150.0),
             _cell("dcd", "pytorch-cpu", 8, f1=0.55, valid=0.7, ms=35.0),
             _cell("naive", "pytorch-cpu", 8, f1=0.30, valid=0.01, ms=32.0),
             _cell("dcd", "ort-fp32", 8, f1=0.56, valid="not computed: no grammar", ms=12.0),
             _cell("dcd", "trt-fp16", 8, "not available: no TensorRT")]
    fig = quality_vs_latency_figure(_result(cells))
    try:
        f1_ax, valid_ax = fig.axes[:2]
        assert len(fig.axes) == 2
        assert f1_ax.get_ylabel() == "finding F1 (micro)" and valid_ax.get_ylabel() == "valid sentences (share)"

        def points(ax) -> list[tuple[float, float]]:
            return sorted(tuple(map(float, xy)) for coll in ax.collections for xy in coll.get_offsets())

        assert points(f1_ax) == [(12.0, 0.56), (32.0, 0.30), (35.0, 0.55), (150.0, 0.52)]
        assert points(valid_ax) == [(32.0, 0.01), (35.0, 0.7), (150.0, 1.0)]  # validity not computed: no point
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_cli_reports_missing_data(tmp_path):
    from click.testing import CliRunner

    from benchmarks.cli import main

    r = CliRunner().invoke(main, ["--data", str(tmp_path / "nowhere"), "--n", "2", "--engines", "pytorch",
                                  "--out", str(tmp_path / "o")])
    # one line naming the folder and exit status 1, not a traceback
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), repr(r.exception)
    assert f"Error: {tmp_path / 'nowhere'}: no such file or folder" in r.output


def test_ideal_speedup_formula_and_publish(tmp_path):
    from benchmarks.cli import publish
    from benchmarks.ideal import ideal_speedups

    assert ideal_speedups({1: 1.0, 16: 2.0, 32: 4.0}, [8, 16]) == {8: 4.0, 16: 4.0}
    assert ideal_speedups({1: 1.0}, [8]) == {}  # a missing timing gives no number, never a guess
    md, png = tmp_path / "results.md", tmp_path / "quality_vs_latency.png"
    md.write_text("# t\n")
    png.write_bytes(b"\x89PNG")
    result = {"command": "echo-bench --n 3", "machine": {"date": "d", "cpu": "c", "cpus_usable": 2, "cpu_count": 2,
                                                          "gpu": None, "platform": "p", "libraries": {"torch": "x"}},
              "threads": {"requested": 2}, "wall_s": 1.0}
    out = publish(result, {"md": md, "png": png, "json": tmp_path / "results.json"}, dest=tmp_path / "pub")
    assert sorted(p.name for p in out) == ["RUN.md", "quality_vs_latency.png", "results.md"]
    assert "echo-bench --n 3" in (tmp_path / "pub" / "RUN.md").read_text()


def test_median_timings_keeps_tokens_and_takes_medians():
    from benchmarks.engines import Decoded
    from benchmarks.harness import median_timings

    runs = [Decoded([5, 6], "a b", 3, True, session_s=s, decode_s=2 * s, prefill_s=0.1 * s, prefill_session_s=0.05 * s,
                    decode_passes=2) for s in (3.0, 1.0, 2.0)]
    m = median_timings(runs)
    assert (m.tokens, m.text, m.passes, m.eos, m.decode_passes) == ([5, 6], "a b", 3, True, 2)
    assert (m.session_s, m.decode_s, m.prefill_s) == (2.0, 4.0, pytest.approx(0.2))
    # engines that time nothing (PyTorch) keep None
    plain = median_timings([Decoded([1], "x", 1, False), Decoded([1], "x", 1, False)])
    assert plain.session_s is None and plain.decode_s is None


def test_generate_against_another_system(bench_setup, tmp_path):
    """`echo-train generate --against`: the paired F1 difference to another prediction file."""
    from click.testing import CliRunner

    from echo_train.cli import main
    from echo_train.metrics import finding_f1
    from echo_train.stages.common import load_split

    root, _, data, _ = bench_setup
    args = ["generate", "--data", str(data), "--split", "test", "--device", "cpu"]
    ar, dcd = tmp_path / "ar.jsonl", tmp_path / "dcd.jsonl"
    r = CliRunner().invoke(main, args + ["--ckpt", str(root / "runs/ar"), "--mode", "ar", "--out", str(ar)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, args + ["--ckpt", str(root / "runs/echo"), "--mode", "onestep", "--out", str(dcd),
                                         "--against", str(ar)])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output[r.output.index("{"):])["finding_micro_f1_vs_against"]
    refs = {s.id: s.report for s in load_split(str(data), "test", None)}
    read = lambda p: {json.loads(x)["id"]: json.loads(x)["report"] for x in p.read_text().splitlines()}
    assert got["delta"] == pytest.approx(finding_f1(read(dcd), refs)["micro_f1"] - finding_f1(read(ar), refs)["micro_f1"])
    assert got["ci95"][0] <= got["delta"] <= got["ci95"][1] and got["n"] == len(refs)
    # a prediction file that lacks these studies is refused with the reason
    (tmp_path / "short.jsonl").write_text(ar.read_text().splitlines()[0] + "\n")
    r = CliRunner().invoke(main, args + ["--ckpt", str(root / "runs/ar"), "--mode", "ar",
                                         "--against", str(tmp_path / "short.jsonl")])
    assert r.exit_code != 0 and "no prediction for" in r.output


def test_attention_shapes_times_both_step_graphs_on_both_engines():
    from benchmarks.attention_shapes import AttentionShapesConfig, time_step_graphs

    cfg = AttentionShapesConfig(layers=1, capacity=64, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64,
                                prefix_len=16, repeats=2)
    ms = time_step_graphs(cfg)
    assert set(ms) == {"ort ar_step", "torch ar_step", "ort block_step", "torch block_step"}
    assert all(v > 0 for v in ms.values())
