"""Stage-3 evidence: DCD against naive one-step, factorised distillation and ground-truth one-step.

Trains the two ablation students from the same teacher (reusing its trajectory shards), then
decodes the test split with every method and reports finding F1 and sentence validity, for all
test studies and separately for the finding combinations no training study has.

    python -m benchmarks.dcd_ablations --data data/synth --teacher runs/base --dcd runs/echo --ar runs/ar
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from echo_train.decoding.run import DecodeSpec, decode_studies
from echo_train.metrics import finding_f1
from echo_train.metrics.validity import sentence_validity
from echo_train.model.checkpoint import load_checkpoint
from echo_train.stages.common import load_split
from echo_train.stages.errors import StageError


def _quality(preds: dict[str, str], refs: dict[str, str], ids: list[str]) -> dict:
    if not ids:
        return {"n": 0}
    p, r = {i: preds[i] for i in ids}, {i: refs[i] for i in ids}
    f1, v = finding_f1(p, r), sentence_validity(p)
    return {"n": len(ids), "finding_micro_f1": f1["micro_f1"], "finding_micro_f1_5": f1["micro_f1_5"],
            "valid_sentence_rate": v["valid_sentence_rate"], "repeat_or_contradiction_rate": v["repeat_or_contradiction_rate"]}


def _train_ablation(method: str, data: str, teacher: str, out: str, steps: int, threads: int) -> None:
    if (Path(out) / "training_state.pt").is_file():
        import torch

        st = torch.load(Path(out) / "training_state.pt", weights_only=False)
        if st.get("finished") and st["step"] >= steps:
            return
    cmd = [sys.executable, "-m", "echo_train.cli", "stage3", "--data", data, "--init", teacher, "--out", out,
           "--method", method, "--steps", str(steps), "--threads", str(threads), "--trajectories", f"{Path(teacher).parent}/echo_trajectories"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


@click.command()
@click.option("--data", default="data/synth", show_default=True)
@click.option("--ar", "ar_ckpt", default="runs/ar", show_default=True)
@click.option("--teacher", default="runs/base", show_default=True)
@click.option("--dcd", default="runs/echo", show_default=True)
@click.option("--steps", type=int, default=200, show_default=True, help="Training steps of each ablation student.")
@click.option("--n", "limit", type=int, default=200, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", "out_dir", default="benchmarks/out/dcd_ablations", show_default=True)
def main(data, ar_ckpt, teacher, dcd, steps, limit, threads, out_dir) -> None:
    """Train the stage-3 ablations and compare every one-step method with the teacher and AR."""
    import torch

    torch.set_num_threads(threads)
    runs = Path(dcd).parent
    students = {"dcd": dcd}
    for method in ("factorised", "gt"):
        path = str(runs / f"echo-{method}")
        _train_ablation(method, data, teacher, path, steps, threads)
        students[method] = path
    try:
        studies = load_split(data, "test", limit)
    except StageError as e:
        raise click.ClickException(str(e)) from None
    refs = {s.id: s.report for s in studies}
    unseen = [s.id for s in studies if s.attributes.get("unseen_combination")]
    seen = [s.id for s in studies if not s.attributes.get("unseen_combination")]
    t_model, tok = load_checkpoint(teacher)
    B = t_model.cfg.block_size
    rows = [("AR (stage 1)", ar_ckpt, DecodeSpec("ar", B)),
            (f"teacher, {B} steps", teacher, DecodeSpec("multistep", B, steps=B)),
            ("naive one-step (teacher, 1 step)", teacher, DecodeSpec("onestep-unfused", B)),
            ("DCD one-step", students["dcd"], DecodeSpec("onestep", B)),
            ("factorised distillation, one-step", students["factorised"], DecodeSpec("onestep", B)),
            ("ground-truth one-step", students["gt"], DecodeSpec("onestep", B))]
    results = []
    for name, ckpt, spec in rows:
        model, tok = load_checkpoint(ckpt)
        preds, stats = decode_studies(model, tok, studies, spec, batch_size=50)
        results.append({"method": name, "checkpoint": ckpt, "forward_passes_per_report": stats["forward_passes_per_report"],
                        "all": _quality(preds, refs, list(refs)), "unseen": _quality(preds, refs, unseen),
                        "seen": _quality(preds, refs, seen)})
        print(json.dumps(results[-1]), flush=True)
    by = {r["method"]: r for r in results}
    naive, teach, dcd_r = by["naive one-step (teacher, 1 step)"], by[f"teacher, {B} steps"], by["DCD one-step"]
    gap = {}
    for key in ("valid_sentence_rate", "finding_micro_f1"):
        g = teach["all"][key] - naive["all"][key]
        gap[key] = (dcd_r["all"][key] - naive["all"][key]) / g if abs(g) > 1e-9 else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": results, "gap_closed": gap}, indent=2))
    lines = ["| method | passes/report | F1 (all) | F1 (unseen) | valid sentences (all) | valid (unseen) | repeat/contra |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        a, u = r["all"], r["unseen"]
        lines.append(f"| {r['method']} | {r['forward_passes_per_report']:.1f} | {a['finding_micro_f1']:.3f} | "
                     f"{u.get('finding_micro_f1', float('nan')):.3f} | {a['valid_sentence_rate']:.3f} | "
                     f"{u.get('valid_sentence_rate', float('nan')):.3f} | {a['repeat_or_contradiction_rate']:.3f} |")
    lines.append("")
    lines.append("Share of the naive-to-teacher gap that DCD closes: " +
                 ", ".join(f"{k} {v:.0%}" if v is not None else f"{k} n/a" for k, v in gap.items()))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
