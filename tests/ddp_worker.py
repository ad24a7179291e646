"""Run by tests/test_training.py::test_ddp_two_cpu_processes under torchrun: 2 CPU processes, gloo.

`setup()` is shared with that test's single-process reference run, so both train the same initial
weights on the same global batches with the same config.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_model, make_tokenizer  # noqa: E402
from training_fixtures import RandomReports, collate  # noqa: E402

from echo_train.stages.stage1_ar import ar_loss  # noqa: E402
from echo_train.stages.trainer import TrainConfig, train  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 4  # 2 samples per rank


def setup():
    """(tokenizer, model, data, config) of the DDP run and of its single-process reference.

    The AR loss draws no noise, so 2 ranks x 2 samples must equal 1 process x 4 samples: the RAD
    loss seeds its masks per rank (trainer.step_generator), so a 2-rank run of it legitimately
    differs from a 1-process run. Every response is 16 tokens: each rank's mean loss has the same
    weight, so the mean of the ranks' gradients is the gradient of the global mean. fp32 (not
    "auto", which is bf16 on some CPUs) and lr 1e-2 without warmup: the weights move ~1e-2, far
    above the float32 noise of a different reduction order.
    """
    tok = make_tokenizer()
    model = make_tiny_model(tok, stage="ar", block_size=4)
    data = RandomReports(tok, model.n_image_tokens)
    cfg = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH, lr=1e-2, warmup_steps=0, save_every=100, eval_every=100,
                      threads=1, precision="fp32")
    return tok, model, data, cfg


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok, model, data, cfg = setup()
    state = train(model, tok, data, collate, ar_loss, cfg, out, desc="ddp")
    # every rank must hold identical weights after DDP steps (rank 0's are saved in `out`)
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, w)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged"
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} finished step {state['step']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
