"""Stage 3: Direct Conditional Distillation into a one-step-per-block student (and its ablations)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from runtime.text import ReportTokenizer

from ..model.checkpoint import CheckpointError, load_checkpoint
from ..model.echo_model import EchoModel
from .batches import scored_cross_entropy
from .common import load_split, make_collate, make_dataset
from .errors import StageError
from .dcd_targets import P_INTERMEDIATE, build_dcd_inputs, build_gt_onestep_inputs, factorised_distillation_loss
from .stage2_rad import make_diffusion_loss
from .trainer import LossFn, TrainConfig, dist_info, maybe_init_distributed, pick_device, train
from .trajectories import generate_onpolicy_targets, generate_trajectories, load_trajectories

METHODS = ("dcd", "factorised", "gt")


@dataclass
class Stage3Config:
    data: str = "data/synth"
    init: str = "runs/base"
    out: str = "runs/echo"
    method: str = "dcd"  # dcd | factorised (ablation) | gt: ground-truth one-step (ablation)
    trajectories: Optional[str] = None  # default: <out>_trajectories
    teacher_steps: Optional[int] = None  # default: the block size
    # Share of blocks that also train from an intermediate teacher state (a second noisy copy).
    # 0 by default: on the stage-3 ladder (benchmarks/results/dcd-ladder) p=1 stays inside the demo
    # recipe's paired CI for more step time, and a shorter run with p=0.5 cost quality (numbers:
    # docs/results.md, "Measured in code's stead"). The all-mask state is the one the one-step decoder sees.
    p_intermediate: float = P_INTERMEDIATE
    intermediate_copies: int = 1  # noisy copies that carry intermediate states (each drawn independently)
    # weight of the stage-2 loss (on the ground truth) mixed back in, meant to keep multi-step ability; it
    # costs one-step coherence on the ladder
    diffusion_mix: float = 0.0
    # stage 1's next-token loss on the clean copy (teacher's report); causal context only. No gain on the ladder.
    ar_weight: float = 0.0
    # 900 steps: on the demo teacher more valid sentences and F1 than 400, and on the stage-3 ladder
    # neither twice the steps nor four times the images did better (docs/results.md)
    # On-policy DCD (DAgger), a round after an ordinary stage 3: the student at student_init writes the
    # training reports one step per block, the teacher writes each block in the context of the student's
    # earlier blocks, and the student trains on those records beside the teacher's own trajectories.
    student_init: Optional[str] = None  # start the student from this stage-3 checkpoint (default: the teacher)
    on_policy: bool = False  # add the on-policy records of student_init (needs student_init)
    onpolicy_targets: Optional[str] = None  # default: <out>_onpolicy
    # > 0: the teacher starts each on-policy block from the student's this many most confident tokens of it
    # (mode-seeking targets: the wording the student leans to), not from all-mask
    onpolicy_anchor: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=900, batch_size=16, lr=5e-4, warmup_steps=10))
    train_limit: Optional[int] = None


class TrajectoryDataset(Dataset):
    """Training items joined with the teacher's trajectory of the same study, once per record set
    (the teacher's own trajectories, and on-policy records in the student's contexts)."""

    def __init__(self, base: Dataset, studies, *record_sets: dict[str, dict]) -> None:
        self.items = [(i, records[s.id]) for records in record_sets for i, s in enumerate(studies) if s.id in records]
        self.base = base

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        j, rec = self.items[i]
        return {**self.base[j], "teacher": rec}


def make_trajectory_collate(tokenizer, block_size: int):
    base = make_collate(tokenizer)

    def collate(items: list[dict]) -> dict:
        out = base([{k: v for k, v in it.items() if k != "teacher"} for it in items])
        recs = [it["teacher"] for it in items]
        nblk = max(len(r["states"]) for r in recs)
        max_states = max(s.shape[0] for r in recs for s in r["states"])
        b = len(recs)
        teacher = torch.full((b, nblk * block_size), tokenizer.eos_id, dtype=torch.long)
        context = teacher.clone()
        states = torch.full((b, nblk, max_states, block_size), tokenizer.mask_id, dtype=torch.long)
        n_states = torch.zeros(b, nblk, dtype=torch.long)
        valid = torch.zeros(b, nblk, dtype=torch.bool)
        for i, r in enumerate(recs):
            teacher[i, : r["tokens"].numel()] = r["tokens"]
            ctx = r.get("context", r["tokens"])  # on-policy: the student's report; else the teacher's own
            context[i, : ctx.numel()] = ctx
            for k, st in enumerate(r["states"]):
                states[i, k, : st.shape[0]] = st
                states[i, k, st.shape[0] :] = st[-1]
                n_states[i, k] = st.shape[0]
                valid[i, k] = True
        out.update(teacher_ids=teacher, context_ids=context, states=states, n_states=n_states, block_valid=valid)
        return out

    return collate


def run_stage3(cfg: Stage3Config) -> dict:
    if cfg.method not in METHODS:
        raise StageError(f"unknown method {cfg.method!r}; choose from {METHODS}")
    teacher, tok = _load_teacher(cfg.init)
    B = teacher.cfg.block_size
    steps = cfg.teacher_steps or B
    device = pick_device(cfg.train.device)
    maybe_init_distributed(device)
    rank, world = dist_info()
    studies = load_split(cfg.data, "train", cfg.train_limit)
    record_sets = []
    if cfg.method in ("dcd", "factorised"):
        traj_dir = Path(cfg.trajectories or f"{cfg.out}_trajectories") / f"B{B}_S{steps}"
        generate_trajectories(teacher, tok, studies, traj_dir, B, steps, device=device, rank=rank, world=world)
        if world > 1:
            torch.distributed.barrier()
        record_sets.append(load_trajectories(traj_dir))
    student = _load_student(cfg, B)
    if cfg.on_policy:
        op_dir = Path(cfg.onpolicy_targets or f"{cfg.out}_onpolicy") / \
            f"B{B}_S{steps}{f'_A{cfg.onpolicy_anchor}' if cfg.onpolicy_anchor else ''}"
        generate_onpolicy_targets(student, teacher, tok, studies, op_dir, B, steps, device=device, rank=rank, world=world,
                                  anchor=cfg.onpolicy_anchor)
        if world > 1:
            torch.distributed.barrier()
        record_sets.append(load_trajectories(op_dir))
    base = make_dataset(studies, tok, student.cfg)
    if cfg.method == "gt":
        train_set, collate = base, make_collate(tok)
    else:
        train_set, collate = TrajectoryDataset(base, studies, *record_sets), make_trajectory_collate(tok, B)
    loss_fn = _loss_fn(cfg, teacher, tok.mask_id, device)
    if rank == 0:
        print(f"[stage3] {cfg.method}{' on-policy' if cfg.on_policy else ''}: student from {cfg.student_init or cfg.init}, "
              f"block {B}, teacher steps {steps}, {len(train_set)} training records -> {cfg.out}")
    return train(student, tok, train_set, collate, loss_fn, cfg.train, Path(cfg.out), desc=f"stage3 {cfg.method}")


def _load_student(cfg: Stage3Config, block_size: int) -> EchoModel:
    """The student's starting weights: the teacher's, or a stage-3 student's (student_init)."""
    if cfg.on_policy and (cfg.student_init is None or cfg.method != "dcd"):
        raise StageError("on-policy DCD needs --student-init, a stage-3 (dcd) student whose own reports "
                         "give the contexts, and --method dcd")
    if cfg.student_init is None:
        student, _ = load_checkpoint(cfg.init)
    else:
        try:
            student, _ = load_checkpoint(cfg.student_init)
        except CheckpointError as e:
            raise StageError(f"--student-init: {e}") from e
        if student.cfg.stage != "dcd" or student.cfg.block_size != block_size:
            raise StageError(f"{cfg.student_init} is a '{student.cfg.stage}' checkpoint of block {student.cfg.block_size}; "
                             f"--student-init takes a stage-3 (dcd) student of the teacher's block size {block_size}")
    student.cfg.stage = "dcd"
    return student


def _load_teacher(init: str | Path) -> tuple[EchoModel, ReportTokenizer]:
    """The stage-2 (rad) checkpoint stage 3 starts from, refused as a StageError otherwise."""
    try:
        teacher, tok = load_checkpoint(init)
    except CheckpointError as e:
        raise StageError(f"stage 3 starts from the stage-2 teacher: {e}") from e
    if teacher.cfg.stage != "rad":
        raise StageError(f"{init} is a '{teacher.cfg.stage}' checkpoint; stage 3 needs the stage-2 (rad) teacher")
    return teacher, tok


def _loss_fn(cfg: Stage3Config, teacher: EchoModel, mask_id: int, device: torch.device) -> LossFn:
    """The student's loss of cfg.method: one-step targets from the ground truth (gt), the factorised
    distillation from the teacher's outputs (factorised, the teacher kept on `device`), or DCD's
    targets from the teacher's trajectories (dcd), with cfg.diffusion_mix of the diffusion loss."""
    B = teacher.cfg.block_size
    diffusion = make_diffusion_loss(B, mask_id) if cfg.diffusion_mix > 0 else None
    if cfg.method == "gt":
        def loss_fn(model: EchoModel, batch: dict, gen: torch.Generator) -> torch.Tensor:
            return scored_cross_entropy(model, build_gt_onestep_inputs(model, batch, mask_id, gen, cfg.p_intermediate))
    elif cfg.method == "factorised":
        teacher.to(device).eval().requires_grad_(False)

        def loss_fn(model: EchoModel, batch: dict, gen: torch.Generator) -> torch.Tensor:
            return factorised_distillation_loss(model, teacher, batch, mask_id)
    else:
        def loss_fn(model: EchoModel, batch: dict, gen: torch.Generator) -> torch.Tensor:
            loss = scored_cross_entropy(model, build_dcd_inputs(model, batch, mask_id, gen, cfg.p_intermediate,
                                                                cfg.ar_weight, cfg.intermediate_copies))
            if diffusion is not None:
                loss = loss + cfg.diffusion_mix * diffusion(model, batch, gen)
            return loss
    return loss_fn
