"""The training loop every stage shares: exact resume, DDP under torchrun, progress, checkpoints.

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and the noise of
step s is drawn from a generator seeded by (seed, s, rank). A resumed run therefore replays
exactly the batches and noise an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from runtime.text import ReportTokenizer

from ..model.checkpoint import load_training_state, save_checkpoint
from ..model.echo_model import EchoModel
from .errors import StageError

LossFn = Callable[[EchoModel, dict, torch.Generator], torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, split across processes
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    device: str = "auto"
    threads: Optional[int] = None
    stop_after: Optional[int] = None  # stop (with a checkpoint) at this step: tests use it to interrupt
    time_limit_s: Optional[float] = None  # stop (with a checkpoint) after this much training time
    # Fit the whole run into this many seconds, counted from budget_start (default: the start of
    # train()): after budget_probe_steps steps the step count shrinks to what the measured step
    # time leaves, and the learning-rate schedule follows the new count, so a slow CPU (fp32
    # matmuls, no AVX-512) trains a shorter, complete schedule instead of overrunning. Never below
    # budget_min_fraction of `steps`; the plan is kept in the training state, so a resume follows it.
    time_budget_s: Optional[float] = None
    budget_start: Optional[float] = None  # time.time() when the stage command started
    budget_probe_steps: int = 10
    budget_min_fraction: float = 0.25
    freeze: tuple[str, ...] = ()  # parameter-name prefixes kept fixed, e.g. "vision" (tower + projector)
    # Matmul precision of forward and backward (weights and optimiser stay fp32): "bf16" autocast,
    # "fp32", or "auto" = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32.
    # On the 2-core demo machine (AVX512-BF16) bf16 makes a stage-3 step 26% faster at the same loss.
    precision: str = "auto"


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision `train` uses on `device`: "bf16" or "fp32"."""
    if name not in PRECISIONS:
        raise StageError(f"unknown training precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "fp32"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(device: torch.device) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int, world: int) -> list[int]:
    """Dataset indices of global step `step` for this rank: a seeded permutation per epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    chunk = perm[k * batch_size : (k + 1) * batch_size]
    return chunk[rank::world]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    prog = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def plan_budgeted_steps(requested: int, done: int, step_s: float, remaining_s: float, min_fraction: float) -> int:
    """The step count that fits `remaining_s` at `step_s` per step after `done` steps, within
    [max(done, min_fraction * requested), requested]."""
    fit = done + int(max(0.0, remaining_s) // max(step_s, 1e-9))
    floor = max(done, math.ceil(min_fraction * requested))
    return max(floor, min(requested, fit))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


class StopRequested(Exception):
    pass


class LossModule(torch.nn.Module):
    """Makes a stage's loss the forward of a module, so DDP can wrap it and sync gradients."""

    def __init__(self, model: EchoModel, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        return self.loss_fn(self.model, batch, gen)


def train(
    model: EchoModel,
    tokenizer: ReportTokenizer,
    train_set: Dataset,
    collate: Callable[[list], dict],
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: str | Path,
    val_set: Optional[Dataset] = None,
    desc: str = "train",
) -> dict:
    """Train `model` for cfg.steps, resuming from out_dir/training_state.pt when present."""
    out = Path(out_dir)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    maybe_init_distributed(device)
    rank, world = dist_info()
    model.to(device)
    frozen = [n for n, p in model.named_parameters() if n.startswith(tuple(cfg.freeze))] if cfg.freeze else []
    if cfg.freeze and not frozen:
        raise StageError(f"--freeze {','.join(cfg.freeze)} matches no parameter of the model")
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    start, history = 0, []
    budget_t0 = cfg.budget_start if cfg.budget_start is not None else time.time()
    planned: Optional[int] = None  # the step count a time budget chose
    state = load_training_state(out)
    if state is not None:
        budget_done = state.get("planned_steps") is not None and state.get("requested_steps") == cfg.steps
        if state.get("finished") and (state["step"] >= cfg.steps or (budget_done and state["step"] >= state["planned_steps"])):
            if rank == 0:
                print(f"[{desc}] {out} already finished at step {state['step']}; reusing it")
            return state
        from ..model.checkpoint import load_weights

        load_weights(model, out / "model.safetensors")  # in place, one tensor at a time
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state.get("history", [])
        if budget_done:
            planned = int(state["planned_steps"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        if rank == 0:
            print(f"[{desc}] resuming {out} from step {start}")
    loss_module: torch.nn.Module = LossModule(model, loss_fn)
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(loss_module)

    def training_state(step: int, finished: bool) -> dict:
        return {
            "step": step, "finished": finished, "optimizer": opt.state_dict(), "train_config": asdict(cfg),
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "history": history, "world_size": world, "stage": model.cfg.stage, "precision": precision,
            "requested_steps": cfg.steps, "planned_steps": planned,
        }

    def checkpoint(step: int, finished: bool) -> None:
        if rank == 0:
            save_checkpoint(out, model, tokenizer, training_state(step, finished))
        if world > 1:
            dist.barrier()

    stop = {"flag": False}

    def on_signal(signum, frame):  # Ctrl-C / kill: finish the step, save, exit
        stop["flag"] = True

    old = signal.signal(signal.SIGINT, on_signal) if rank == 0 else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = None
    if rank == 0:
        from tqdm.auto import tqdm

        print(f"[{desc}] {device.type}, {precision} matmuls, {torch.get_num_threads()} threads", flush=True)
        bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=2.0)
    t0, seen = time.time(), 0
    step = start
    run_cfg = cfg if planned is None else replace(cfg, steps=planned)  # the schedule follows the plan
    probe: Optional[tuple[int, float]] = None  # (step, time) where the step-time probe began
    replanning = False  # this process planned, so it keeps planning (a resumed plan is kept as it is)
    try:
        model.train()
        while step < run_cfg.steps:
            if cfg.time_budget_s is not None and (planned is None or replanning):
                # the first step after a (re)start is slow (allocation, caches): time the next ones;
                # plan after budget_probe_steps, then again every 5x as many steps (step times drift:
                # a stage-3 run measured 0.47 s/step at first and averaged 0.58)
                timed = step - probe[0] if probe is not None else 0
                if probe is None and step > start:
                    probe = (step, time.time())
                elif timed >= cfg.budget_probe_steps and (planned is None or timed % (5 * cfg.budget_probe_steps) == 0):
                    step_s = (time.time() - probe[1]) / timed
                    remaining = cfg.time_budget_s - (time.time() - budget_t0) - 3 * step_s  # last eval and save
                    new = _agree(plan_budgeted_steps(cfg.steps, step, step_s, remaining, cfg.budget_min_fraction),
                                 device, world)
                    if planned is None or abs(new - planned) > 0.01 * planned:
                        verdict = "all fit" if new == cfg.steps else f"training {new} of {cfg.steps} steps"
                        if rank == 0:
                            print(f"\n[{desc}] time budget {cfg.time_budget_s:.0f} s: {step_s:.2f} s/step measured, "
                                  f"{max(0.0, remaining):.0f} s left -> {verdict}", flush=True)
                    planned, replanning = new, True
                    run_cfg = replace(cfg, steps=planned)
                    if bar is not None:
                        bar.total = planned
                        bar.refresh()
                    if step >= planned:
                        break
            idx = batch_indices(len(train_set), step, cfg.batch_size, cfg.seed, rank, world)
            batch = _to_device(collate([train_set[i] for i in idx]), device)
            for g in opt.param_groups:
                g["lr"] = lr_at(run_cfg, step)
            with amp:
                loss = loss_module(batch, step_generator(cfg.seed, step, rank))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            seen += len(idx) * world
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step == run_cfg.steps:
                    rate = seen / max(1e-9, time.time() - t0)
                    bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.1f}")
            rec = {"step": step, "loss": float(loss.item()), "time": time.time() - t0}
            if val_set is not None and (step % cfg.eval_every == 0 or step == run_cfg.steps):
                rec["val_loss"] = evaluate_loss(model, val_set, collate, loss_fn, cfg, device)
                model.train()
            history.append(rec)
            if step % cfg.save_every == 0 and step < run_cfg.steps:
                checkpoint(step, False)
            out_of_time = cfg.time_limit_s is not None and time.time() - t0 >= cfg.time_limit_s
            if stop["flag"] or out_of_time or (cfg.stop_after is not None and step >= cfg.stop_after):
                checkpoint(step, False)
                raise StopRequested
        checkpoint(step, True)
    except StopRequested:
        if rank == 0:
            print(f"\n[{desc}] stopped at step {step}; checkpoint saved to {out}; run the same command to resume")
    finally:
        if bar is not None:
            bar.close()
        if old is not None:
            signal.signal(signal.SIGINT, old)
    model.eval()
    if rank == 0:
        (out / "train_log.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")
    return training_state(step, step >= run_cfg.steps)


def _agree(n: int, device: torch.device, world: int) -> int:
    """Rank 0's value of n on every process (DDP ranks must run the same number of steps)."""
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


@torch.no_grad()
def evaluate_loss(model: EchoModel, val_set: Dataset, collate, loss_fn: LossFn, cfg: TrainConfig, device) -> float:
    """Mean loss on the first eval_batches of the validation set, with fixed noise."""
    model.eval()
    losses = []
    n = len(val_set)
    for k in range(cfg.eval_batches):
        idx = list(range(k * cfg.batch_size, min(n, (k + 1) * cfg.batch_size)))
        if not idx:
            break
        batch = _to_device(collate([val_set[i] for i in idx]), device)
        losses.append(float(loss_fn(model, batch, torch.Generator().manual_seed(12345 + k))))
    return float(np.mean(losses)) if losses else float("nan")
