"""Stage-3 ladder (issue 32): what closes DCD's one-step validity gap to its multi-step teacher.

Every rung is one `echo-train stage3` run from the same stage-2 teacher (the width rung from a
teacher twice as wide), decoded one step per block on the same fresh test studies, and compared
with that teacher's multi-step decoding on the same studies: sentence validity and finding F1, on
all studies and on the finding combinations no training study has, with paired bootstrap CIs of
the differences (both systems scored on every resample of the same studies).

    python -m benchmarks.dcd_ladder --data DATA --teacher runs/base --wide-teacher runs-wide/base \\
        --work /work/ladder-runs/ladder --out benchmarks/results/dcd-ladder

Rungs of group "decoding" train nothing: they decode another rung's student (or the teacher) with up to
two passes per block, a second one only on the positions the first left below the confidence threshold
(not one step per block; the table's passes column says what it cost). `--teacher-forced N` scores the
students' one-step blocks in the teacher's context (DCD's training layout) against their free-running
decode: what their own earlier blocks cost them.

Each rung writes OUT/rungs/NAME.json as soon as it is scored; trained students and decoded reports
are kept under --work, so a rerun only does what is missing. `--rungs a,b` runs a subset (two
shells can share the work); `--table-only` rebuilds the table and plot from the JSONs. A rung
without a JSON is listed as "not run", never with a number.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import click
import numpy as np

# The demo's stage-3 recipe (benchmarks/demo.py DemoConfig.stage3 before this ladder): the 1x point.
DEMO_STEPS, DEMO_BATCH, DEMO_LR = 900, 16, 5e-4
N_BOOT = 1000


@dataclass(frozen=True)
class Rung:
    name: str
    group: str  # length | states | loss | data | width | policy | decoding
    what: str  # one line for the table
    steps: int = DEMO_STEPS
    p_intermediate: float = 0.0
    intermediate_copies: int = 1
    diffusion_mix: float = 0.0
    ar_weight: float = 0.0
    lr: float = DEMO_LR
    # trajectories on this many more training images (no reports needed: the teacher writes the targets),
    # of finding combinations the training split already has, so the unseen test combinations stay unseen
    extra_images: int = 0
    wide: bool = False  # from the 2x-wide teacher
    # Decoding (a rung that only decodes differently trains nothing): 1 = the fused one-step decoder; N > 1 =
    # up to N passes per block, where each later pass re-predicts only the positions the earlier ones left
    # below the confidence threshold (rule decode_rule), so a block whose positions are all confident
    # still takes one pass. Not one step per block: the table's passes column says what it cost.
    decode_steps: int = 1
    decode_rule: str = "dynamic"
    student_of: str = ""  # decode another rung's student ("teacher": the rung's teacher) instead of training one
    # A further stage-3 round: start from this rung's student instead of the teacher (its steps come on top)
    continue_from: str = ""
    on_policy: bool = False  # that round also trains in the student's own contexts (DAgger; needs continue_from)
    onpolicy_anchor: int = 0  # the teacher completes each on-policy block around the student's N surest tokens

    def stage3_args(self, work: Path) -> list[str]:
        args = ["--steps", str(self.steps), "--batch-size", str(DEMO_BATCH), "--lr", str(self.lr),
                "--p-intermediate", str(self.p_intermediate), "--intermediate-copies", str(self.intermediate_copies),
                "--diffusion-mix", str(self.diffusion_mix), "--ar-weight", str(self.ar_weight)]
        if self.continue_from:
            args += ["--student-init", str(work / "students" / self.continue_from)]
        if self.on_policy:
            args += ["--on-policy", "--onpolicy-targets", str(work / f"onpolicy-{self.name}"),
                     "--onpolicy-anchor", str(self.onpolicy_anchor)]
        return args


RUNGS = [
    Rung("base", "length", "demo recipe: 900 steps, all-mask state only, CE on the teacher's final tokens"),
    Rung("len2x", "length", "1800 steps (2x)", steps=2 * DEMO_STEPS),
    Rung("len4x", "length", "3600 steps (4x)", steps=4 * DEMO_STEPS),
    # the student underfits (400 -> 900 steps: validity 0.66 -> 0.77): a larger step is the budget-neutral way to more
    Rung("lr2x", "length", "900 steps at lr 1e-3 (2x)", lr=1e-3),
    Rung("mid50", "states", "+ 1 intermediate-state copy, p=0.5 per block", p_intermediate=0.5),
    Rung("mid100", "states", "+ 1 intermediate-state copy, p=1", p_intermediate=1.0),
    Rung("mid100x2", "states", "+ 2 intermediate-state copies, p=1", p_intermediate=1.0, intermediate_copies=2),
    Rung("diff05", "loss", "+ RAD diffusion loss on the ground truth, weight 0.5", diffusion_mix=0.5),
    Rung("ar1", "loss", "+ AR next-token loss on the clean copy (teacher's report), weight 1", ar_weight=1.0),
    # DCD's targets come from the teacher, not from reports: the student can learn from any image. The demo
    # student sees 2000 images 7 times (900 x 16) and drives its loss near 0.1; more images, same steps.
    Rung("img4x", "data", "trajectories on 4x the images (2000 + 6000 report-free, seen combinations)",
         extra_images=6000),
    Rung("wide", "width", "2x-wide LM (3.5M params), own teacher, demo recipe", wide=True),
    # The teacher-forced check (README) puts a third of the gap in the cascade: trained only in the teacher's
    # contexts, the student writes from contexts it never saw after its first broken block. On-policy DCD
    # (DAgger) gives it its own: the base student writes the 2000 training reports one step per block, the
    # teacher completes each block after the student's earlier blocks, and 900 more steps train on those
    # records and the teacher's own. `cont` is the same 900 more steps on the teacher's records alone.
    Rung("cont", "policy", "base student + 900 more steps, the teacher's contexts only (control, 1800 in all)",
         continue_from="base"),
    Rung("onpol", "policy", "base student + 900 more steps, its own contexts too: teacher completes its blocks (DAgger)",
         continue_from="base", on_policy=True),
    # The students mix two wordings where the teacher's choice depends on what they cannot see (README):
    # targets completed around the student's own surest tokens are in the wording it already leans to.
    Rung("onpolA2", "policy", "onpol, the teacher completing each block around the student's 2 surest tokens",
         continue_from="base", on_policy=True, onpolicy_anchor=2),
    # The demo's budget has no room for a round on top: the same 900 steps, split 600 + 300 on-policy.
    Rung("s600", "policy", "600 steps (the first part of s600op300)", steps=600),
    Rung("s600op300", "policy", "s600 student + 300 on-policy steps: the demo's 900 steps, split",
         steps=300, continue_from="s600", on_policy=True),
    Rung("onpol2", "policy", "onpol student + a 2nd on-policy round of 900 steps (its own contexts, 2700 in all)",
         continue_from="onpol", on_policy=True),
    # The students write mixtures of two wordings at positions they cannot decide between (README). A second
    # pass on only those low-confidence positions, in the context of the block's confident ones, can resolve
    # them, at the cost of the one-step promise; the teacher at the same pass budget is the fair comparison.
    Rung("fix2", "decoding", "base student + a 2nd pass per block on positions below confidence 0.85 (not one-step)",
         decode_steps=2, student_of="base"),
    # the base student never saw a partly unmasked block; mid100 trained on the teacher's intermediate states
    Rung("fix2mid", "decoding", "mid100 student + the same 2nd pass (not one-step)", decode_steps=2, student_of="mid100"),
    Rung("teacher2", "decoding", "no student: the demo teacher at the same budget (<= 2 passes per block, same rule)",
         decode_steps=2, student_of="teacher"),
]
BY_NAME = {r.name: r for r in RUNGS}


def _finished(out: Path, steps: int) -> bool:
    state = out / "training_state.pt"
    if not state.is_file():
        return False
    import torch

    s = torch.load(state, map_location="cpu", weights_only=False)
    return bool(s.get("finished")) and int(s.get("step", 0)) >= steps


def train_rung(rung: Rung, data: str, teacher: str, work: Path, threads: int) -> float:
    """Train the rung's student unless finished; returns the wall seconds spent here (0 when skipped)."""
    out = work / "students" / rung.name
    if rung.student_of or _finished(out, rung.steps):
        return 0.0
    # trajectories are shared by every rung of one teacher: generated once, by whichever rung comes first
    traj = work / ("trajectories-wide" if rung.wide else "trajectories")
    if rung.extra_images:
        data = str(more_images(data, work / f"data-extra{rung.extra_images}", rung.extra_images))
        traj = _seed_shards(traj, work / f"trajectories-extra{rung.extra_images}")
    cmd = [sys.executable, "-m", "echo_train.cli", "stage3", "--data", data, "--init", teacher, "--out", str(out),
           "--trajectories", str(traj), "--threads", str(threads), "--device", "cpu", "--eval-every", "100000",
           "--save-every", "300", *rung.stage3_args(work)]
    print("+", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def more_images(data: str, out: Path, n_extra: int, seed: int = 1) -> Path:
    """A data folder whose train split is DATA's followed by n_extra studies of another synth seed, kept only
    when their finding combination is one DATA's train split has (val and test are DATA's)."""
    if (out / "train.json").is_file():
        return out
    from echo_train.data.synth import generate_synth

    src = Path(data)
    base = json.loads((src / "train.json").read_text())
    seen = {r["attributes"]["combination"] for r in base}
    gen = out / "synth"
    generate_synth(gen, n_train=int(n_extra * 2), n_val=1, n_test=1, image_size=json.loads((src / "meta.json").read_text())["image_size"],
                   seed=seed, workers=1)
    extra = [r for r in json.loads((gen / "train.json").read_text()) if r["attributes"]["combination"] in seen][:n_extra]
    if len(extra) < n_extra:
        raise click.ClickException(f"only {len(extra)} extra studies of seen combinations; generate more")
    for r in extra:
        r["sample_id"] = f"extra{seed}-{r['sample_id']}"
    for root, recs in ((src, base), (gen, extra)):  # absolute image paths: the records live apart from their images
        for r in recs:
            r["images"] = [str((root / p).resolve()) for p in r["images"]]
    for split in ("val", "test"):
        (out / f"{split}.json").write_text((src / f"{split}.json").read_text())
    (out / "meta.json").write_text((src / "meta.json").read_text())
    (out / "train.json").write_text(json.dumps(base + extra, indent=1))
    return out


def _seed_shards(src: Path, dst: Path, shard_size: int = 64) -> Path:
    """Copy the base trajectory shards that hold only the base studies (the extra studies come after
    them, in the same order), so only the new images are decoded by the teacher."""
    import shutil

    import torch

    for f in sorted(src.rglob("shard_*.pt")):
        target = dst / f.relative_to(src)
        n = len(torch.load(f, map_location="cpu", weights_only=False)["records"])
        if n == shard_size and not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    return dst


def decode_cached(ckpt: str, mode: str, studies, cache: Path) -> dict[str, str]:
    """Reports of `ckpt` decoded by `mode` (onestep, or multistep at steps = block size), cached as JSON."""
    if cache.is_file():
        return json.loads(cache.read_text())["preds"]
    from echo_train.decoding.run import DecodeSpec, decode_studies
    from echo_train.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(ckpt)
    B = model.cfg.block_size
    spec = DecodeSpec(mode, B, steps=B if mode == "multistep" else None, max_new_tokens=model.cfg.max_response_tokens)
    t = time.time()
    preds, stats = decode_studies(model, tok, studies, spec, batch_size=50, progress=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"checkpoint": ckpt, "mode": mode, "seconds": time.time() - t, "stats": stats,
                                 "preds": preds}))
    return preds


def teacher_decode_from_trajectories(ckpt: str, studies, traj: Path, cache: Path) -> dict[str, str]:
    """The teacher's multi-step reports of `studies` taken from its DCD trajectories of the same studies (the same
    decoder: multistep, block size steps, the default rule and threshold), written where decode_cached looks,
    so a teacher whose test trajectories are needed anyway (--teacher-forced) is decoded once. Trajectories
    are generated here if missing."""
    from echo_train.model.checkpoint import load_checkpoint
    from echo_train.stages.trajectories import load_trajectories

    teacher, tok = load_checkpoint(ckpt)
    t = time.time()
    generate_trajectories_for(teacher, tok, studies, traj)
    recs = load_trajectories(traj)
    preds = {s.id: tok.decode(recs[s.id]["tokens"].tolist()) for s in studies}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"checkpoint": ckpt, "mode": "multistep", "seconds": time.time() - t,
                                 "stats": {"source": str(traj)}, "preds": preds}))
    return preds


def decode_fixup_cached(ckpt: str, steps: int, rule: str, studies, cache: Path) -> tuple[dict[str, str], dict]:
    """Reports of `ckpt` decoded with up to `steps` passes per block (multistep decoder, `rule`, the shared
    threshold), and per report how many denoising passes each of its blocks took: a block takes another pass
    only while a position of it is still masked, i.e. below the threshold and beyond the step's minimum."""
    if cache.is_file():
        d = json.loads(cache.read_text())
        return d["preds"], d["stats"]
    import torch

    from echo_train.decoding.block_diffusion import multistep_generate
    from echo_train.decoding.run import load_pixels
    from echo_train.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(ckpt)
    model.eval()
    B = model.cfg.block_size
    preds, blocks, passes, t = {}, 0, 0, time.time()
    with torch.no_grad():
        for i in range(0, len(studies), 50):
            chunk = studies[i : i + 50]
            px = load_pixels(chunk, model.cfg.vision.image_size, model.cfg.vision.preprocess)
            res = multistep_generate(model, tok, px, B, steps, model.cfg.max_response_tokens, rule, keep_trajectory=True)
            for r, s in enumerate(chunk):
                preds[s.id] = tok.decode(res.tokens[r])
                b_, p_ = _row_passes(res.raw[r], res.trajectories, r, tok.eos_id, tok.mask_id, B)
                blocks, passes = blocks + b_, passes + p_
    stats = {"reports": len(studies), "steps": steps, "rule": rule, "blocks": blocks,
             "passes_per_block": passes / max(1, blocks), "second_pass_share": (passes - blocks) / max(1, blocks),
             "seconds": time.time() - t}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"checkpoint": ckpt, "mode": f"fixup{steps}", "stats": stats, "preds": preds}))
    return preds, stats


def _row_passes(raw, trajectories: list, row: int, eos_id: int, mask_id: int, block_size: int) -> tuple[int, int]:
    """(blocks, denoising passes) of one report: its blocks up to its first EOS block, and per block the
    states before a pass that still held a mask (the batch may run a pass that this row does not need)."""
    blocks = passes = 0
    for k, traj in enumerate(trajectories):
        seq = traj[row]  # [n_states, B], all-mask first
        blocks += 1
        passes += int((seq[:-1] == mask_id).any(-1).sum())
        if bool((raw[k * block_size : (k + 1) * block_size] == eos_id).any()):
            break
    return blocks, passes


def _paired_validity(a: dict, b: dict, n_boot: int) -> dict:
    """Valid-sentence rate of a minus b on the same reports, with a paired percentile bootstrap CI."""
    from echo_train.metrics.bootstrap import bootstrap_ci
    from echo_train.metrics.validity import validity_arrays, validity_from_arrays

    ids = list(a)
    va, vb = validity_arrays([a[i] for i in ids]), validity_arrays([b[i] for i in ids])

    def delta(idx) -> dict:
        return {"delta": validity_from_arrays(va, idx)["valid_sentence_rate"] - validity_from_arrays(vb, idx)["valid_sentence_rate"]}

    ci = bootstrap_ci(delta, len(ids), n_boot, seed=0).get("delta")
    return {"delta": delta(np.arange(len(ids)))["delta"], "ci95": ci}


def score_subset(preds: dict, teacher: dict, refs: dict, ids: list[str], n_boot: int = N_BOOT) -> dict:
    """Validity and finding F1 of preds on `ids`, each with its paired difference to the teacher."""
    from echo_train.metrics import finding_f1
    from echo_train.metrics.finding_f1 import paired_micro_f1_difference
    from echo_train.metrics.validity import sentence_validity

    p, t, r = ({i: d[i] for i in ids} for d in (preds, teacher, refs))
    v = sentence_validity(p)
    return {"n": len(ids), "valid_sentence_rate": v["valid_sentence_rate"], "valid_report_rate": v["valid_report_rate"],
            "repeat_or_contradiction_rate": v["repeat_or_contradiction_rate"],
            "finding_micro_f1": finding_f1(p, r)["micro_f1"],
            "vs_teacher_f1": paired_micro_f1_difference(p, t, r, n_boot=n_boot, seed=0),
            "vs_teacher_validity": _paired_validity(p, t, n_boot)}


def score_rung(preds: dict, teacher: dict, studies) -> dict:
    refs = {s.id: s.report for s in studies}
    unseen = [s.id for s in studies if s.attributes.get("unseen_combination")]
    return {"all": score_subset(preds, teacher, refs, list(refs)), "unseen": score_subset(preds, teacher, refs, unseen)}


def vs_other(preds: dict, other: dict, studies) -> dict:
    """Paired differences to another student (the base rung): what a recipe change itself buys."""
    refs = {s.id: s.report for s in studies}
    unseen = [s.id for s in studies if s.attributes.get("unseen_combination")]
    out = {}
    for key, ids in (("all", list(refs)), ("unseen", unseen)):
        s = score_subset(preds, other, refs, ids)
        out[key] = {"validity": s["vs_teacher_validity"], "f1": s["vs_teacher_f1"]}
    return out


def teacher_row(label: str, ckpt: str, studies, work: Path, tag: str) -> dict:
    """The teacher's own multi-step row (its differences to itself are 0 by construction)."""
    preds = decode_cached(ckpt, "multistep", studies, work / "decoded" / f"teacher-{tag}.json")
    return {"name": f"teacher-{tag}", "what": label, "checkpoint": ckpt, "scores": score_rung(preds, preds, studies)}


def run_rung(rung: Rung, data: str, teachers: dict[str, str], studies, work: Path, out: Path, threads: int) -> dict:
    tag = "wide" if rung.wide else "demo"
    teacher = teachers[tag]
    train_s = train_rung(rung, data, teacher, work, threads)
    ckpt = Path(teacher) if rung.student_of == "teacher" else work / "students" / (rung.student_of or rung.name)
    cache = work / "decoded" / f"{rung.name}.json"
    if rung.decode_steps > 1:
        preds, stats = decode_fixup_cached(str(ckpt), rung.decode_steps, rung.decode_rule, studies, cache)
        decoding = {"passes_per_block": stats["passes_per_block"], "second_pass_share": stats["second_pass_share"]}
    else:
        preds, decoding = decode_cached(str(ckpt), "onestep", studies, cache), {"passes_per_block": 1.0}
    t_preds = decode_cached(teacher, "multistep", studies, work / "decoded" / f"teacher-{tag}.json")
    rec = {"rung": asdict(rung), "teacher": teacher, "student": str(ckpt), "train_seconds_this_call": train_s,
           "train_log": None if rung.student_of else _train_log(ckpt), "decoding": decoding,  # trained by another rung
           "scores": score_rung(preds, t_preds, studies)}
    base = work / "decoded" / "base.json"
    if rung.name != "base" and base.is_file():
        # for the wide rung this is what width buys in absolute terms, its own (wide) teacher included
        rec["vs_base"] = vs_other(preds, json.loads(base.read_text())["preds"], studies)
    (out / "rungs").mkdir(parents=True, exist_ok=True)
    (out / "rungs" / f"{rung.name}.json").write_text(json.dumps(rec, indent=2))
    return rec


def _train_log(ckpt: Path) -> Optional[dict]:
    """Steps and training wall time the trainer recorded (what one rung cost)."""
    import torch

    state = ckpt / "training_state.pt"
    if not state.is_file():
        return None
    s = torch.load(state, map_location="cpu", weights_only=False)
    hist = s.get("history") or [{}]
    # the trainer's clock restarts on a resume, so this is the last uninterrupted stretch's time
    return {"step": s.get("step"), "finished": s.get("finished"), "precision": s.get("precision"),
            "train_minutes": hist[-1].get("time", float("nan")) / 60, "final_loss": hist[-1].get("loss")}


def _ci(d: dict, scale: float = 100.0) -> str:
    lo, hi = d["ci95"] if d.get("ci95") else (float("nan"), float("nan"))
    return f"{scale * d['delta']:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]"


def table_row(name: str, what: str, rec: Optional[dict], teacher: Optional[dict], why_not: str = "") -> str:
    """One markdown row: validity and F1 (all / unseen), each difference to the teacher in points with its CI."""
    if rec is None:
        return f"| {name} | {what} | not run: {why_not} |" + " |" * 10
    a, u = rec["scores"]["all"], rec["scores"]["unseen"]
    ratio = u["valid_sentence_rate"] / teacher["unseen"]["valid_sentence_rate"] if teacher else float("nan")
    mins = (rec.get("train_log") or {}).get("train_minutes")
    return (f"| {name} | {what} | {a['valid_sentence_rate']:.3f} ({_ci(a['vs_teacher_validity'])}) | "
            f"{u['valid_sentence_rate']:.3f} ({_ci(u['vs_teacher_validity'])}) | {ratio:.2f} | "
            f"{a['finding_micro_f1']:.3f} | {_ci(a['vs_teacher_f1'])} | {u['finding_micro_f1']:.3f} | "
            f"{_ci(u['vs_teacher_f1'])} | {a['repeat_or_contradiction_rate']:.3f} | {_vs_base(rec)} | "
            f"{'' if mins is None else f'{mins:.0f}'} | {_passes(name, rec)} |")


def _passes(name: str, rec: dict) -> str:
    """Denoising passes per block: measured per report for a multi-pass rung, else the decoder's own."""
    dec = rec.get("decoding")
    if dec and "second_pass_share" in dec:  # a multi-pass decoder: what it took, per block of a report
        return f"{dec['passes_per_block']:.2f}"
    return "<= 8" if name.startswith("teacher") else "1"


def _vs_base(rec: dict) -> str:
    vb = rec.get("vs_base")
    return "" if not vb else f"{_ci(vb['all']['validity'])} / {_ci(vb['unseen']['validity'])}"


HEADER = ("| rung | recipe | valid sentences, all (Δ vs teacher, pts [95% CI]) | valid, unseen (Δ [CI]) | "
          "unseen validity / teacher's | F1 all | ΔF1 vs teacher, all (pts [CI]) | F1 unseen | ΔF1 unseen (pts [CI]) | "
          "repeat/contra | Δ valid vs base, all / unseen (pts [CI]; teacher-wide: vs teacher-demo) | train min | passes / block |\n|" + "---|" * 13)


def build_table(out: Path, not_run: dict[str, str]) -> str:
    """The ladder table from OUT/rungs/*.json (teacher rows first), plus OUT/table.md and the plot."""
    rungs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "rungs").glob("*.json"))}
    lines = [HEADER]
    for tag in ("demo", "wide"):
        t = rungs.get(f"teacher-{tag}")
        if t:
            lines.append(table_row(t["name"], t["what"], t, t["scores"]))
    if "naive-demo" in rungs and "teacher-demo" in rungs:
        lines.append(table_row("naive", rungs["naive-demo"]["what"], rungs["naive-demo"], rungs["teacher-demo"]["scores"]))
    for r in RUNGS:
        rec = rungs.get(r.name)
        t = rungs.get("teacher-wide" if r.wide else "teacher-demo")
        lines.append(table_row(r.name, r.what, rec, t["scores"] if t else None,
                               not_run.get(r.name, "no result yet")))
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    _plot(out, rungs)
    return text


def _plot(out: Path, rungs: dict[str, dict]) -> None:
    """ladder.png: valid-sentence rate (all, unseen) per rung that ran, its teacher's as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in RUNGS if r.name in rungs]
    if not ran:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    x = np.arange(len(ran))
    for ax, key, label in ((axes[0], "valid_sentence_rate", "valid sentences"), (axes[1], "finding_micro_f1", "finding F1")):
        for off, sub, color in ((-0.2, "all", "#2ca02c"), (0.2, "unseen", "#98df8a")):
            ax.bar(x + off, [rungs[r.name]["scores"][sub][key] for r in ran], 0.4, color=color, label=f"DCD, {sub}")
        for tag, style in (("demo", "--"), ("wide", ":")):
            t = rungs.get(f"teacher-{tag}")
            if t:
                for sub, color in (("all", "#1f77b4"), ("unseen", "#aec7e8")):
                    ax.axhline(t["scores"][sub][key], ls=style, color=color, lw=1, label=f"teacher ({tag}), {sub}")
        ax.set_xticks(x, [r.name for r in ran], rotation=30)
        ax.set_title(f"{label}, 1000 test studies (B=8)")
        ax.set_ylim(0, 1.25 if key == "valid_sentence_rate" else 0.8)
    axes[0].legend(fontsize=6, loc="upper center", ncol=3)  # above the bars: the validity axis leaves room
    fig.text(0.5, 0.005, "one step per block, except fix2, fix2mid, teacher2 (up to 2 passes per block)", ha="center",
             fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ladder.png", dpi=120)
    plt.close(fig)


def reference_rows(data: str, teachers: dict[str, str], studies, work: Path, out: Path) -> None:
    """Teacher rows (multi-step, the reference of every rung) and the demo teacher's naive one-step."""
    (out / "rungs").mkdir(parents=True, exist_ok=True)
    for tag, ckpt in teachers.items():
        if not ckpt or not Path(ckpt, "config.json").is_file():
            continue
        f = out / "rungs" / f"teacher-{tag}.json"
        if not f.is_file():
            row = teacher_row(f"{tag} teacher, 8 steps per block", ckpt, studies, work, tag)
            if tag != "demo":  # a wider teacher against the demo's, paired on the same studies
                demo_preds = decode_cached(teachers["demo"], "multistep", studies, work / "decoded" / "teacher-demo.json")
                row["vs_base"] = vs_other(decode_cached(ckpt, "multistep", studies, work / "decoded" / f"teacher-{tag}.json"),
                                          demo_preds, studies)
                row["vs_base_is"] = "teacher-demo"
            f.write_text(json.dumps(row, indent=2))
    demo = teachers["demo"]
    f = out / "rungs" / "naive-demo.json"
    if not f.is_file():
        t_preds = decode_cached(demo, "multistep", studies, work / "decoded" / "teacher-demo.json")
        preds = decode_cached(demo, "onestep", studies, work / "decoded" / "naive-demo.json")
        f.write_text(json.dumps({"name": "naive-demo", "what": "naive: the demo teacher, one step per block",
                                 "scores": score_rung(preds, t_preds, studies)}, indent=2))


def train_check(data: str, teachers: dict[str, str], names: list[str], work: Path, out: Path, n: int) -> dict:
    """Valid-sentence rate on n of the TRAINING images, whose teacher trajectories the students were
    trained on: can a student fit its own targets? (out/train_check.json, merged with what it holds)"""
    from echo_train.metrics.validity import sentence_validity
    from echo_train.stages.common import load_split

    studies = load_split(data, "train", n)
    f = out / "train_check.json"
    res = json.loads(f.read_text()) if f.is_file() and json.loads(f.read_text()).get("n_train_studies") == n else {}
    res["n_train_studies"] = n
    for tag in {"wide" if BY_NAME[x].wide else "demo" for x in names} | {"demo"}:
        key = "teacher" if tag == "demo" else f"teacher-{tag}"
        traj = work / ("trajectories-wide" if tag == "wide" else "trajectories") / "B8_S8"
        if tag == "wide" and traj.is_dir():
            # the stage-3 trajectories are this teacher's multi-step decodes of these very images
            from echo_train.stages.trajectories import load_trajectories
            from echo_train.model.checkpoint import load_checkpoint

            recs, tok = load_trajectories(traj), load_checkpoint(teachers[tag])[1]
            preds = {s.id: tok.decode(recs[s.id]["tokens"].tolist()) for s in studies}
            res[key] = sentence_validity(preds)["valid_sentence_rate"]
        elif teachers.get(tag):
            preds = decode_cached(teachers[tag], "multistep", studies, work / "decoded" / f"teacher-{tag}-train{n}.json")
            res[key] = sentence_validity(preds)["valid_sentence_rate"]
    for name in names:
        rung = BY_NAME[name]
        if rung.student_of or rung.decode_steps > 1:
            continue  # decoding rungs: their student is another rung's
        ckpt = work / "students" / name
        if _finished(ckpt, rung.steps):
            preds = decode_cached(str(ckpt), "onestep", studies, work / "decoded" / f"{name}-train{n}.json")
            res[name] = sentence_validity(preds)["valid_sentence_rate"]
    f.write_text(json.dumps(res, indent=2))
    return res


def teacher_forced(data: str, teachers: dict[str, str], names: list[str], work: Path, out: Path, n: int,
                   split: str) -> dict:
    """Each student's one-step blocks with the TEACHER's earlier blocks as context (the context it was trained
    on), on n studies of `split`: token accuracy and exact blocks against the teacher's final tokens, and the
    validity of the report these blocks make. Free-running decoding feeds the student its own blocks, so the
    gap between the two is what its own earlier mistakes cost (out/teacher_forced.json, merged)."""
    import torch

    from echo_train.model.checkpoint import load_checkpoint
    from echo_train.stages.common import load_split

    studies = load_split(data, split, n)
    f = out / "teacher_forced.json"
    res = json.loads(f.read_text()) if f.is_file() else {}
    for name in names:
        rung = BY_NAME[name]
        if rung.student_of or rung.decode_steps > 1:
            continue
        ckpt = work / "students" / name
        if not _finished(ckpt, rung.steps):
            continue
        tag = "wide" if rung.wide else "demo"
        traj = work / (("trajectories-wide" if rung.wide else "trajectories") if split == "train"
                       else f"trajectories-{split}-{tag}") / "B8_S8"
        teacher, tok = load_checkpoint(teachers[tag])
        if split != "train":  # the teacher's trajectories of these studies (train: the ones stage 3 trained on)
            generate_trajectories_for(teacher, tok, studies, traj)
        student, _ = load_checkpoint(str(ckpt))
        with torch.no_grad():
            res.setdefault(split, {"n": n})[name] = forced_scores(student, tok, studies, traj)
        f.write_text(json.dumps(res, indent=2))
        print(json.dumps({"split": split, "rung": name, **res[split][name]}), flush=True)
    return res


def generate_trajectories_for(teacher, tok, studies, traj: Path) -> None:
    from echo_train.stages.trajectories import generate_trajectories

    B = teacher.cfg.block_size
    generate_trajectories(teacher, tok, studies, traj, B, B)


def forced_scores(student, tok, studies, traj: Path) -> dict:
    """Token accuracy, exact blocks and report validity of the student's all-mask predictions in DCD's
    training layout (build_dcd_inputs: the teacher's report as the clean context), greedy."""
    import torch

    from echo_train.metrics.validity import sentence_validity
    from echo_train.stages.batches import IGNORE_INDEX
    from echo_train.stages.common import make_dataset
    from echo_train.stages.dcd_targets import build_dcd_inputs
    from echo_train.stages.stage3_dcd import TrajectoryDataset, make_trajectory_collate
    from echo_train.stages.trajectories import load_trajectories

    student.eval()
    B = student.cfg.block_size
    ds = TrajectoryDataset(make_dataset(studies, tok, student.cfg), studies, load_trajectories(traj))
    collate = make_trajectory_collate(tok, B)
    tok_ok = tok_n = blk_ok = blk_n = 0
    forced, teacher = {}, {}
    for i in range(0, len(ds), 25):
        items = [ds[j] for j in range(i, min(i + 25, len(ds)))]
        inp = build_dcd_inputs(student, collate(items), tok.mask_id, torch.Generator().manual_seed(0), 0.0)
        h, _ = student.lm(inp.embeds, inp.position_ids, inp.mask)
        if inp.sources is not None:
            h = h[:, inp.sources]
        logits = student.lm.lm_head(h).float()
        logits[..., tok.mask_id] = float("-inf")  # as the decoder: the mask token is never an answer
        pred = logits.argmax(-1)
        for r in range(len(items)):
            sel = (inp.targets[r] != IGNORE_INDEX).nonzero().flatten()  # the all-mask copy's blocks only
            p, t = pred[r, sel], inp.targets[r, sel]
            tok_ok, tok_n = tok_ok + int((p == t).sum()), tok_n + len(t)
            blk_ok, blk_n = blk_ok + int((p.view(-1, B) == t.view(-1, B)).all(-1).sum()), blk_n + len(t) // B
            sid = studies[ds.items[i + r][0]].id
            forced[sid], teacher[sid] = tok.decode(p.tolist()), tok.decode(t.tolist())
    unseen = {s.id for s in studies if s.attributes.get("unseen_combination")} & set(forced)

    def valid(d: dict, ids) -> float:
        return sentence_validity({i: d[i] for i in ids})["valid_sentence_rate"]

    res = {"token_accuracy": tok_ok / max(1, tok_n), "exact_blocks": blk_ok / max(1, blk_n),
           "valid_sentence_rate": valid(forced, list(forced)), "teacher_valid_sentence_rate": valid(teacher, list(forced)),
           "studies": len(ds)}
    if unseen:  # the training split has none
        res.update(valid_sentence_rate_unseen=valid(forced, sorted(unseen)),
                   teacher_valid_sentence_rate_unseen=valid(teacher, sorted(unseen)), studies_unseen=len(unseen))
    return res


@click.command()
@click.option("--data", required=True, help="Synthetic data folder: train split as the demo's, a fresh test split.")
@click.option("--teacher", default="runs/base", show_default=True, help="The demo's stage-2 teacher (B=8).")
@click.option("--wide-teacher", default=None, help="Stage-2 teacher of the 2x-wide model (preset tiny-wide).")
@click.option("--work", default="benchmarks/out/dcd-ladder", show_default=True, help="Students, trajectories, decoded reports.")
@click.option("--out", "out_dir", default="benchmarks/results/dcd-ladder", show_default=True)
@click.option("--rungs", default=",".join(r.name for r in RUNGS), show_default=True)
@click.option("--n", "limit", type=int, default=1000, show_default=True, help="Test studies.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--table-only", is_flag=True, help="Rebuild table.md and ladder.png from the rung JSONs.")
@click.option("--references/--no-references", default=True, show_default=True,
              help="Decode and score the teachers (and the naive one-step) before the rungs; a second shell sharing "
                   "--work can leave them to the first.")
@click.option("--train-check", "train_check_n", type=int, default=0, metavar="N",
              help="Instead of the rungs: validity of the teacher and the listed rungs' students on N training images.")
@click.option("--teacher-forced", "forced_n", type=int, default=0, metavar="N",
              help="Instead of the rungs: the listed students' blocks with the teacher's context, on N studies of "
                   "--forced-split (teacher_forced.json).")
@click.option("--forced-split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--not-run", "not_run", multiple=True, metavar="RUNG=REASON", help="Why a rung has no result (in the table).")
def main(data, teacher, wide_teacher, work, out_dir, rungs, limit, threads, table_only, references, train_check_n,
         forced_n, forced_split, not_run) -> None:
    """Run the stage-3 ladder's rungs (train, decode, score) and write the table and plot."""
    import torch

    torch.set_num_threads(threads)
    out, work_p = Path(out_dir), Path(work)
    reasons = dict(x.split("=", 1) for x in not_run)
    if forced_n:
        teacher_forced(data, {"demo": teacher, "wide": wide_teacher}, [x for x in rungs.split(",") if x], work_p, out,
                       forced_n, forced_split)
        return
    if train_check_n:
        click.echo(json.dumps(train_check(data, {"demo": teacher, "wide": wide_teacher}, [x for x in rungs.split(",") if x],
                                          work_p, out, train_check_n)))
        return
    if not table_only:
        from echo_train.stages.common import load_split

        studies = load_split(data, "test", limit)
        teachers = {"demo": teacher, "wide": wide_teacher}
        names = [x for x in rungs.split(",") if x]
        unknown = [x for x in names if x not in BY_NAME]
        if unknown:
            raise click.ClickException(f"unknown rungs {unknown}; choose from {list(BY_NAME)}")
        if references:
            reference_rows(data, {k: v for k, v in teachers.items() if v}, studies, work_p, out)
        for name in names:
            rung = BY_NAME[name]
            if rung.wide and not wide_teacher:
                reasons.setdefault(name, "no --wide-teacher given")
                continue
            rec = run_rung(rung, data, teachers, studies, work_p, out, threads)
            print(json.dumps({"rung": name, **{k: rec["scores"][k]["valid_sentence_rate"] for k in ("all", "unseen")}}), flush=True)
    click.echo(build_table(out, reasons))


if __name__ == "__main__":
    main()
