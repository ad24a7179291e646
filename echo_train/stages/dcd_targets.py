"""DCD target builder: what the one-step student sees and what it must output.

For every block k of the teacher's on-policy report, the student's input is
  prefix + the teacher's blocks < k (clean) + block k in the all-mask state (always), and in a
  second noisy copy a sampled intermediate state of the teacher's trajectory,
and its target is the teacher's FINAL tokens of block k on all B positions: one joint sample
of the block, not per-position marginals (the non-factorised supervision).
On-policy DCD swaps the clean blocks for the student's own one-step report and takes as block k's
target the teacher's completion after it, so the student learns to continue from its own mistakes.

All blocks of a study train in one forward through the RAD layout: noisy block k attends to
the prefix, clean blocks < k and itself, exactly the context of fused pass k at inference.

The ablations live here too, each a different target for the same layout:
  factorised: the teacher's per-position distributions at the all-mask state (soft targets);
  ground-truth one-step: the ground-truth report's blocks instead of the teacher's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.echo_model import EchoModel
from .batches import IGNORE_INDEX, ModelInputs, add_clean_copy_ar_loss, rad_inputs, sample_block_noise

# Share of blocks that also train from an intermediate teacher state: stage 3's default
# (Stage3Config.p_intermediate says why it is 0), so a direct call trains what the stage trains.
P_INTERMEDIATE = 0.0


def _rad_inputs(model: EchoModel, px, prefix, clean_ids, noisy: list[torch.Tensor], targets: list[torch.Tensor]) -> ModelInputs:
    """The RAD layout at the model's own block size (stage 3 trains the teacher's blocks)."""
    return rad_inputs(model, model.cfg.block_size, px, prefix, clean_ids, noisy, targets)


def _intermediate_copy(states: torch.Tensor, n_states: torch.Tensor, block_ok: torch.Tensor, all_mask: torch.Tensor,
                       p_intermediate: float, gen: torch.Generator) -> torch.Tensor:
    """One noisy copy: each block, with probability p_intermediate, in a uniformly drawn intermediate
    state of the teacher's trajectory (strictly between all-mask and final), else all-mask. [b, nblk*B]"""
    b, nblk, _, B = states.shape
    dev = states.device
    n_mid = (n_states - 2).clamp(min=0)  # states strictly between all-mask and final
    use_mid = (torch.rand(b, nblk, generator=gen).to(dev) < p_intermediate) & (n_mid > 0)
    pick = 1 + (torch.rand(b, nblk, generator=gen).to(dev) * n_mid.clamp(min=1)).long().clamp(max=(n_mid - 1).clamp(min=0))
    idx = torch.where(use_mid, pick, torch.zeros_like(pick))
    chosen = torch.gather(states, 2, idx[:, :, None, None].expand(b, nblk, 1, B)).squeeze(2).reshape(b, nblk * B)
    return torch.where(block_ok, chosen, all_mask)


def build_dcd_inputs(model: EchoModel, batch: dict, mask_id: int, gen: torch.Generator,
                     p_intermediate: float = P_INTERMEDIATE, ar_weight: float = 0.0,
                     intermediate_copies: int = 1) -> ModelInputs:
    """Copy 1: every block all-mask. Copies 2..1+intermediate_copies (when p_intermediate > 0): each
    block, with probability p_intermediate, in a uniformly drawn intermediate state of the teacher's
    trajectory (else all-mask), drawn independently per copy. Every copy's target is the teacher's
    final block. ar_weight > 0 (causal context): the clean copy, the teacher's report, also gets
    stage 1's next-token loss.

    batch (stage3_dcd.make_trajectory_collate): teacher_ids [b,R] (EOS-padded), states [b,nblk,S,B] (padded),
    n_states [b,nblk], block_valid [b,nblk], context_ids [b,R]: the clean copy, the teacher's report or
    (on-policy DCD) the student's own, with teacher_ids the teacher's blocks written in its context.
    """
    B = model.cfg.block_size
    teacher, states, n_states, valid = batch["teacher_ids"], batch["states"], batch["n_states"], batch["block_valid"]
    clean = batch["context_ids"]
    block_ok = valid.repeat_interleave(B, 1)
    targets = torch.where(block_ok, teacher, torch.full_like(teacher, IGNORE_INDEX))
    all_mask = torch.full_like(teacher, mask_id)
    noisy, tgts = [all_mask], [targets]
    if p_intermediate > 0:
        for _ in range(intermediate_copies):
            noisy.append(_intermediate_copy(states, n_states, block_ok, all_mask, p_intermediate, gen))
            tgts.append(targets)
    inputs = _rad_inputs(model, batch["pixel_values"], batch["prefix_ids"], clean, noisy, tgts)
    add_clean_copy_ar_loss(model, inputs, batch["prefix_ids"].shape[1], clean, block_ok, ar_weight)
    return inputs


def build_gt_onestep_inputs(model: EchoModel, batch: dict, mask_id: int, gen: torch.Generator,
                            p_intermediate: float = P_INTERMEDIATE) -> ModelInputs:
    """Ablation: the ground-truth report's blocks as one-step targets on all positions, from the
    all-mask state (copy 1) and, like DCD, a partially masked state (copy 2)."""
    B = model.cfg.block_size
    resp, keep = batch["response_ids"], batch["response_mask"]
    b, r = resp.shape
    # score blocks up to the one holding the report's EOS, as for the teacher's reports
    block_ok = keep.reshape(b, r // B, B).any(-1).repeat_interleave(B, 1)
    targets = torch.where(block_ok, resp, torch.full_like(resp, IGNORE_INDEX))
    noisy, tgts = [torch.full_like(resp, mask_id)], [targets]
    if p_intermediate > 0:
        partial, _ = sample_block_noise(resp, B, mask_id, gen)
        use_mid = (torch.rand(b, r // B, generator=gen) < p_intermediate).repeat_interleave(B, 1).to(resp.device)
        noisy.append(torch.where(use_mid, partial, noisy[0]))
        tgts.append(targets)
    return _rad_inputs(model, batch["pixel_values"], batch["prefix_ids"], resp, noisy, tgts)


def factorised_distillation_loss(student: EchoModel, teacher: EchoModel, batch: dict, mask_id: int) -> torch.Tensor:
    """Ablation: match the teacher's per-position distributions at the all-mask state."""
    teacher_ids, valid = batch["teacher_ids"], batch["block_valid"]
    B = student.cfg.block_size
    block_ok = valid.repeat_interleave(B, 1)
    all_mask = torch.full_like(teacher_ids, mask_id)
    targets = torch.where(block_ok, teacher_ids, torch.full_like(teacher_ids, IGNORE_INDEX))
    with torch.no_grad():
        t_in = _rad_inputs(teacher, batch["pixel_values"], batch["prefix_ids"], teacher_ids, [all_mask], [targets])
        th, _ = teacher.lm(t_in.embeds, t_in.position_ids, t_in.mask)
        t_logits = teacher.lm.lm_head(t_in.scored(th)[0]).float()
        t_logits[:, mask_id] = float("-inf")
        soft = F.softmax(t_logits, -1)
    s_in = _rad_inputs(student, batch["pixel_values"], batch["prefix_ids"], teacher_ids, [all_mask], [targets])
    sh, _ = student.lm(s_in.embeds, s_in.position_ids, s_in.mask)
    s_logits = student.lm.lm_head(s_in.scored(sh)[0]).float()
    return -(soft * F.log_softmax(s_logits, -1)).sum(-1).mean()
