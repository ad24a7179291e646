"""RAD against the symmetric BD3-style duplication: training speed and validation loss at equal time.

Both modes start from the same initial weights, see the same batches, and are scored with the
same loss (masked-position cross-entropy of noisy response blocks, whose attention context is
identical in both layouts). Only the cost differs: P + 2R tokens against 2(P + R).

    python -m benchmarks.rad_vs_symmetric --data data/synth --seconds 120
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import torch

from echo_train.model.echo_model import EchoModel
from echo_train.stages.common import build_tokenizer, load_split, make_collate, make_dataset, preset
from echo_train.stages.errors import StageError
from echo_train.stages.stage2_rad import Stage2Config, make_diffusion_loss
from echo_train.stages.trainer import TrainConfig, evaluate_loss, train


def compare(data: str, seconds: float, image_size: int, patch_size: int, block_size: int, batch_size: int,
            threads: int, train_limit: int | None, causal_context: bool = Stage2Config.causal_context) -> dict:
    torch.set_num_threads(threads)
    studies = load_split(data, "train", train_limit)
    val = load_split(data, "val", 64)
    tok = build_tokenizer(studies, 1024)
    cfg = preset("tiny")
    cfg.lm.vocab_size, cfg.stage, cfg.block_size = tok.vocab_size, "rad", block_size
    cfg.causal_context = causal_context  # the clean context's attention, the same in both layouts
    cfg.vision.image_size, cfg.vision.patch_size = image_size, patch_size
    train_set, val_set, collate = make_dataset(studies, tok, cfg), make_dataset(val, tok, cfg), make_collate(tok)
    prefix_len = len(train_set[0]["prefix_ids"])
    resp_len = sum(len(train_set[i]["response_ids"]) for i in range(min(200, len(train_set)))) / min(200, len(train_set))
    for i in range(len(train_set)):  # decode every image before the clock starts
        train_set[i]
    for i in range(len(val_set)):
        val_set[i]
    score = make_diffusion_loss(block_size, tok.mask_id)
    out: dict = {"prefix_len": prefix_len, "mean_response_len": resp_len, "seconds": seconds, "batch_size": batch_size,
                 "threads": threads, "block_size": block_size, "causal_context": causal_context}
    for mode in ("rad", "symmetric"):
        torch.manual_seed(0)
        model = EchoModel(cfg)
        tcfg = TrainConfig(steps=100_000, batch_size=batch_size, lr=1e-3, warmup_steps=20, save_every=10**9,
                           eval_every=10**9, time_limit_s=seconds, threads=threads)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            state = train(model, tok, train_set, collate, make_diffusion_loss(block_size, tok.mask_id, symmetric=mode == "symmetric"),
                          tcfg, Path(tmp) / mode, desc=mode)
            wall = time.time() - t0
        steps = state["step"]
        train_time = state["history"][-1]["time"] if state["history"] else wall
        out[mode] = {
            "steps": steps,
            "samples_per_s": steps * batch_size / train_time,
            "val_loss": evaluate_loss(model, val_set, collate, score, TrainConfig(batch_size=16, eval_batches=4), torch.device("cpu")),
        }
    out["speedup"] = out["rad"]["samples_per_s"] / out["symmetric"]["samples_per_s"]
    return out


@click.command()
@click.option("--data", default="data/synth", show_default=True)
@click.option("--seconds", type=float, default=120.0, show_default=True, help="Training time per mode.")
@click.option("--image-size", type=int, default=128, show_default=True, help="128 px / patch 8 = 256 image tokens.")
@click.option("--patch-size", type=int, default=8, show_default=True)
@click.option("--block-size", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--train-limit", type=int, default=512, show_default=True)
@click.option("--causal-context/--block-causal-context", default=Stage2Config.causal_context, show_default=True,
              help="Attention of the clean context in both layouts (stage 2's default: causal).")
@click.option("--out", "out_path", default="benchmarks/out/rad_vs_symmetric.json", show_default=True)
def main(data, seconds, image_size, patch_size, block_size, batch_size, threads, train_limit, causal_context, out_path) -> None:
    """Measure RAD vs symmetric duplication: samples/s and validation loss at equal wall time.
    Both use the diffusion loss only: the comparison is of the layouts."""
    try:
        res = compare(data, seconds, image_size, patch_size, block_size, batch_size, threads, train_limit, causal_context)
    except StageError as e:  # missing data: one line, exit 1
        raise click.ClickException(str(e)) from None
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(res, indent=2))
    click.echo(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
