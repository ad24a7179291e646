"""benchmarks/gpu_scale.py runs end to end on the demo shapes (on a CPU: eager passes, no CUDA
graphs): every cell measured, written as JSON and Markdown, with real numbers in them."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_gpu_scale_runs_the_demo_shape_and_writes_its_table(tmp_path):
    from benchmarks.gpu_scale import GpuScaleConfig, run

    cfg = GpuScaleConfig(shapes=["demo"], batches=[1, 2], blocks=[8], tokens=16, pass_repeats=2, out=tmp_path,
                         device="cpu")
    rows = run(cfg, "test")
    assert [(r["batch"], r["block"]) for r in rows] == [(1, 8), (2, 8)]
    for r in rows:
        assert "error" not in r, r
        for k in ("dcd_eager", "ar_eager"):
            assert r[k]["tokens_per_s"] > 0 and r[k]["passes"] == (16 // 8 + 1 if k.startswith("dcd") else 16)
        assert r["ideal"] > 0 and r["achieved"] > 0 and r["hf_decode_tokens_per_s"] > 0
        assert r["pass_mode"] == "eager" and "dcd_cuda_graphs" not in r
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == 2 and saved["meta"]["device"] == "cpu"
    md = (tmp_path / "results.md").read_text()
    assert md.count("| demo |") == 2
