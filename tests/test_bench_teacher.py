"""echo-bench's teacher rows on onnxruntime and the steps sweep, on a tiny TRAINED teacher.

A random teacher writes one token over and over and is never confident, so a decoder that
ignores its cache or the unmasking rule would still "match". The varied model
(tests/varied_models.py) writes a different report per image, and its confidences cross the
0.85 threshold, so the engine's teacher rows are compared with PyTorch's on informative tokens.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import make_tokenizer  # noqa: E402
from tests.test_export import write_varied_dataset  # noqa: E402

B, MAX_NEW, STEPS = 8, 32, [1, 2, 4]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A trained RAD teacher, its engine folder (fp32, batch 1) and one bench run with the steps
    sweep on onnxruntime and (for the token comparison) on PyTorch."""
    from benchmarks.engines import Paths
    from benchmarks.harness import BenchConfig, run_benchmark
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from varied_models import as_stage, get_varied

    root = tmp_path_factory.mktemp("bench_teacher")
    tok = make_tokenizer()
    teacher = as_stage(get_varied(tok, shifted=True, causal_context=False), "rad", block_size=B)
    teacher.cfg.max_response_tokens = MAX_NEW
    save_checkpoint(root / "runs/base", teacher, tok)
    data = write_varied_dataset(root / "data", 4, 3)
    build(BuildOptions(ckpt=root / "runs/base", out=root / "engines/base", precisions=["fp32"], capacity=96,
                       calib_size=2, verify_n=2, data=data), log=lambda s: None)
    cfg = BenchConfig(
        data=str(data), split="test", n=3, methods=["teacher", "naive", "dcd"], engines="pytorch,ort-fp32,ort-fp16",
        block_sizes=[B], teacher_steps=STEPS, sweep_engines=["ort-fp32", "pytorch-cpu"],
        paths=Paths(ar_ckpt=str(root / "runs/ar"), teacher_ckpt=str(root / "runs/base"),
                    dcd_ckpt=str(root / "runs/echo"), engine_dir=str(root / "engines/echo"),
                    naive_engine_dir=str(root / "engines/base")),
        repeats=1, runtime_repeats=1, warmup=1, threads=1, throughput_batch=1, metrics=["finding_f1", "validity"],
        n_boot=0, ideal_repeats=3, out=str(root / "out"), log=lambda s: None)
    result, paths = run_benchmark(cfg)
    cells = {(c["method"], c["engine"]): c for c in json.loads(paths["json"].read_text())["cells"]}
    return tok, result, paths, cells


def test_teacher_rows_on_onnxruntime_write_the_pytorch_tokens(sweep):
    from varied_models import assert_informative

    tok, _, _, cells = sweep
    methods = ["teacher", "naive"] + [f"teacher@{k}" for k in STEPS]
    for method in methods:
        ort, pt = cells[(method, "ort-fp32")], cells[(method, "pytorch-cpu")]
        assert ort["status"] == "ok" and pt["status"] == "ok", (method, ort["status"], pt["status"])
    differ = {m: (cells[(m, "ort-fp32")]["pred_tokens"], cells[(m, "pytorch-cpu")]["pred_tokens"]) for m in methods
              if cells[(m, "ort-fp32")]["pred_tokens"] != cells[(m, "pytorch-cpu")]["pred_tokens"]}
    assert not differ, f"engine tokens != PyTorch tokens (ort, pytorch): {differ}"
    for method in methods:
        ort, pt = cells[(method, "ort-fp32")], cells[(method, "pytorch-cpu")]
        # the engine stores the prompt's last block with one commit pass of its own (runtime/multistep.py);
        # PyTorch's prefill stores it: one pass more per report on the engine, the same tokens
        extra = 1 if method.startswith("teacher") else 0
        assert ort["forward_passes_per_report"] == pt["forward_passes_per_report"] + extra, method
    # the comparison means something: distinct reports, several tokens each (EOS appended: reports end)
    assert_informative([t + [tok.eos_id] for t in cells[("teacher", "pytorch-cpu")]["pred_tokens"].values()],
                       tok.eos_id, min_distinct=4)
    # fewer steps: fewer passes (B steps + a commit per block down to 1 + 1)
    passes = [cells[(m, "ort-fp32")]["forward_passes_per_report"] for m in [f"teacher@{k}" for k in STEPS] + ["teacher"]]
    assert passes == sorted(passes) and passes[0] < passes[-1]
    assert [cells[(f"teacher@{k}", "ort-fp32")]["steps"] for k in STEPS] + [cells[("teacher", "ort-fp32")]["steps"]] \
        == STEPS + [B]
    # the teacher folder holds fp32 graphs only: the fp16 cells say why instead of failing
    assert cells[("teacher", "ort-fp16")]["status"].startswith("not available: ")
    assert ("teacher@1", "ort-fp16") not in cells  # the sweep runs on the sweep engines only


def test_sweep_table_and_plot(sweep):
    from benchmarks.plot import teacher_steps_figure

    _, result, paths, _ = sweep
    md = paths["md"].read_text()
    sec = md[md.index("## Teacher steps sweep"):md.index("## Ideal vs achieved")]
    rows = [r.split(" | ") for r in sec.splitlines() if r.startswith("| ") and not r.startswith("| B |")]
    got = [(r[1], r[2], r[3]) for r in rows if r[3] == "ort-fp32"]
    assert got == [("1", "naive one-step", "ort-fp32"), ("1", "teacher (1 step)", "ort-fp32"),
                   ("2", "teacher (2 steps)", "ort-fp32"), ("4", "teacher (4 steps)", "ort-fp32"),
                   ("8", "teacher (B steps)", "ort-fp32")]
    assert "steps sweep 1, 2, 4 and B on ort-fp32, pytorch-cpu" in md
    assert paths["sweep_png"].name == "teacher_steps.png" and paths["sweep_png"].stat().st_size > 0
    fig = teacher_steps_figure(result)
    try:
        lines = fig.axes[0].get_lines()  # one line per (engine, B) through the step counts
        assert sorted(len(ln.get_xdata()) for ln in lines) == [4, 4]
        # no student in this run: the plot says why its point is missing
        assert any(t.get_text().startswith("DCD student: not available: ") for t in fig.axes[0].texts)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_one_runtime_decodes_multistep_after_fused(sweep):
    """The teacher's engine in both modes on ONE EchoRuntime: multi-step tokens must not depend on
    whether the fused mode ran before (a second decoder once rebound the shared block_step graph)."""
    from runtime import EchoRuntime
    from runtime.multistep import MultistepOptions
    from runtime.schedule import DEFAULT_UNMASK_RULE

    _, result, _, cells = sweep
    root = cells[("teacher", "ort-fp32")]["engine_dir"]
    images = [s.image_paths[0] for s in _studies(result)]
    rt = EchoRuntime(root, precision="fp32", batch_size=1, threads=1, mode="multistep")
    opts = MultistepOptions(2, DEFAULT_UNMASK_RULE)

    def multistep() -> list[list[int]]:
        return [list(rt.generate([p], mode="multistep", multistep=opts)[0].tokens) for p in images]

    before = multistep()
    rt.generate(images[:1], mode="fused")
    assert multistep() == before


def _studies(result: dict):
    from echo_train.stages.common import load_split

    return load_split(result["config"]["data"], "test", result["studies"]["n"])
