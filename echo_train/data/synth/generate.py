"""Writing the synthetic benchmark to disk in the ECHO evaluation JSON format.

Layout of OUT:
    images/<id>.png                      8-bit grayscale PNG
    train.json, val.json, test.json      [{"sample_id", "images": ["images/<id>.png"],
                                           "ground_truth": {"findings", "impression"},
                                           "labels": {14 CheXpert observations -> 1/0/-1/None},
                                           "attributes": {...}}]
    meta.json                            seed, counts, generator version, combinations
    preview.png                          (with preview=True) a contact sheet

Determinism: findings and reports come from one generator seeded by `seed`, in order
(train, val, test); every image has its own seed derived from (seed, split, index), so
the output does not depend on the number of worker processes.
Held-out splits: `unseen_fraction` of val and test studies have a finding combination
(`findings.combination_key`) that no training study has; `attributes["unseen_combination"]`
marks them.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from .findings import combination_key, sample_findings, sample_split_findings
from .render import render_study
from .reports import write_report

GENERATOR_VERSION = "synth-cxr-1"
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _image_seed(seed: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]).generate_state(1)[0])


def _render_job(job: tuple) -> tuple[str, dict]:
    path, findings, size, seed = job
    img, info = render_study(findings, size, seed)
    Image.fromarray(img, mode="L").save(path, optimize=False, compress_level=1)
    return path, info


def plan_studies(n_train: int, n_val: int, n_test: int, seed: int, unseen_fraction: float = 0.2) -> dict[str, list[dict]]:
    """Findings, report and labels of every study (no images): {split: [record]}."""
    rng = np.random.default_rng(seed)
    train = [(sample_findings(rng), False) for _ in range(n_train)]
    seen = {combination_key(f) for f, _ in train}
    splits = {
        "train": train,
        "val": sample_split_findings(rng, n_val, seen, unseen_fraction),
        "test": sample_split_findings(rng, n_test, seen, unseen_fraction),
    }
    out: dict[str, list[dict]] = {}
    for split, items in splits.items():
        recs = []
        for i, (f, unseen) in enumerate(items):
            sid = f"{split}-{i:05d}"
            rep = write_report(rng, f)
            recs.append({
                "sample_id": sid,
                "images": [f"images/{sid}.png"],
                "ground_truth": {"findings": rep["findings"], "impression": rep["impression"]},
                "labels": rep["labels"],
                "attributes": {
                    "split": split,
                    "findings": f,
                    "combination": combination_key(f),
                    "unseen_combination": bool(unseen),
                    "normal": not f,
                    "image_seed": _image_seed(seed, split, i),
                },
            })
        out[split] = recs
    return out


def generate_synth(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    image_size: int = 128,
    seed: int = 0,
    preview: bool = False,
    workers: int = 2,
    unseen_fraction: float = 0.2,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Generate the benchmark into out_dir; returns the meta dict (also written to meta.json).

    `progress(n)` is called after every n images written (the CLI passes a tqdm update)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plan = plan_studies(n_train, n_val, n_test, seed, unseen_fraction)
    records = [r for split in ("train", "val", "test") for r in plan[split]]
    jobs = [(str(out / r["images"][0]), r["attributes"]["findings"], image_size, r["attributes"]["image_seed"])
            for r in records]
    infos = _render_all(jobs, workers, progress)
    for r in records:
        r["attributes"].update(infos[str(out / r["images"][0])])
    for split in ("train", "val", "test"):
        (out / f"{split}.json").write_text(json.dumps(plan[split], indent=1))
    meta = _meta(plan, seed, image_size, unseen_fraction)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if preview:
        from .preview import write_preview

        meta["preview"] = str(write_preview(out, plan["test"] + plan["train"]))
    return meta


def _render_all(jobs: list[tuple], workers: int, progress: Optional[Callable[[int], None]]) -> dict[str, dict]:
    """image path -> what rendering it reported, for every job (in `workers` processes when there
    are enough jobs to pay for them)."""
    infos: dict[str, dict] = {}
    workers = max(1, min(int(workers), os.cpu_count() or 1))
    if workers > 1 and len(jobs) > 64:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for path, info in pool.imap(_render_job, jobs, chunksize=32):
                infos[path] = info
                if progress:
                    progress(1)
    else:
        for job in jobs:
            path, info = _render_job(job)
            infos[path] = info
            if progress:
                progress(1)
    return infos


def _meta(plan: dict[str, list[dict]], seed: int, image_size: int, unseen_fraction: float) -> dict:
    """meta.json: how the benchmark was made and what its splits hold."""
    seen = {r["attributes"]["combination"] for r in plan["train"]}
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "counts": {s: len(plan[s]) for s in ("train", "val", "test")},
        "normal_fraction": {s: round(float(np.mean([r["attributes"]["normal"] for r in plan[s]] or [0])), 4)
                            for s in plan},
        "unseen_fraction": unseen_fraction,
        "unseen_counts": {s: sum(r["attributes"]["unseen_combination"] for r in plan[s]) for s in ("val", "test")},
        "seen_combinations": len(seen),
        "distinct_reports": {s: len({json.dumps(r["ground_truth"]) for r in plan[s]}) for s in plan},
    }
