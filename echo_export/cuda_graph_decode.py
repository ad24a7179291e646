"""The fixed-shape graphs of graphs.py run in PyTorch on the model's device: the one-step block
loop and the AR loop over static buffers, each pass captured once as a CUDA graph and replayed.

This is the GPU form of the decode loops without ONNX or TensorRT: at batch 1 a GPU pass of a
small or mid-size model is launch-bound in eager PyTorch (hundreds of kernels per pass), and a
CUDA graph replays them in one launch. Capture needs every tensor a pass touches to stay where it
is, so:
- the KV cache is one buffer per kind, [L, b, kvH, CAP, dh] in the model's dtype, allocated once;
- each pass reads static input buffers (token ids, positions, past length, cache slots) that the
  loop fills by copy, and writes its new keys and values into the cache inside the graph
  (`index_copy_` at slots past_len + i), so a replay is the whole pass;
- every pass's positions, lengths and slots are computed before the loop, on the device.
CAP has one block (one token for AR) more than the report needs, so the last pass's write, whose
keys no later pass reads, stays inside the buffer.

One class for both modes: the passes differ only in what runtime/decode_mode.DecodeMode says (ids
fed, ids stored, positions). It runs the export's graph modules (echo_export/graphs.py), which the
layer rule keeps out of echo_train, so it lives here beside them.

Elsewhere (a CPU, or capture=False) the same passes run eagerly on the same buffers, which is
what the CPU tests compare with fused_onestep_generate / ar_generate, token for token. The prefill
runs eagerly once per report (one pass; nothing to gain from a graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from echo_train.decoding.common import DecodeResult
from echo_train.model.echo_model import EchoModel
from runtime.decode_mode import FUSED, DecodeMode
from runtime.schedule import cut_rows_at_eos, holds_eos
from runtime.text import ReportTokenizer

from .graphs import make_graph


class CapturedPass:
    """`fn(**inputs) -> tensor` over static input buffers. With capture (CUDA only), `fn` is run a
    few times on a side stream (allocator and autotuning settle) and then recorded once into a
    torch.cuda.CUDAGraph; a call copies its inputs into the static buffers and replays. Without
    capture a call runs `fn` on the same buffers. The returned tensor is the pass's static output:
    copy it before the next call if it must be kept."""

    def __init__(self, fn: Callable[..., torch.Tensor], example: dict[str, torch.Tensor], capture: bool,
                 warmup: int = 3) -> None:
        self.fn = fn
        self.inputs = {k: v.clone() for k, v in example.items()}
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.output: Optional[torch.Tensor] = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(**self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for k, v in inputs.items():
            self.inputs[k].copy_(v)
        if self.graph is None:
            return self.fn(**self.inputs)
        self.graph.replay()
        return self.output


@dataclass
class StaticDecodeConfig:
    batch: int
    max_new_tokens: int
    cuda_graphs: bool = True  # only where the model is on a CUDA device
    stop_at_eos: bool = True  # False: every report runs to max_new_tokens (speed measurements)


class StaticDecoder:
    """One decode mode (runtime/decode_mode.DecodeMode: "fused", the semantics of
    fused_onestep_generate over BlockStepGraph, or "ar", ar_generate's over ArPrefillGraph +
    ArStepGraph) over static buffers: the prefix, the cache, and every pass's positions, past
    lengths and cache slots, computed before the loop on the device."""

    def __init__(self, model: EchoModel, tokenizer: ReportTokenizer, cfg: StaticDecodeConfig, mode: str) -> None:
        P = len(tokenizer.prefix_ids(model.n_image_tokens))
        self.mode = md = DecodeMode.of(mode, P, model.cfg.block_size)
        if md.name == FUSED and (md.tail or model.cfg.decode_layout != "echo"):
            raise NotImplementedError("the CUDA-graph decoder follows ECHO's own layout (a prompt in whole blocks, the "
                                      "mask token excluded); decode imported checkpoints with fused_onestep_generate")
        self.model, self.tok, self.cfg = model.eval(), tokenizer, cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.capture = cfg.cuda_graphs and self.device.type == "cuda"
        self.n_passes = md.passes(cfg.max_new_tokens)
        self.capacity = md.slots_needed(cfg.max_new_tokens) + md.width  # the last pass's write stays inside
        self._allocate(model, tokenizer)
        with torch.no_grad():
            self.step = self._captured_step(make_graph(md.step, model, self.capacity, P, tokenizer.mask_id).to(self.device))

    def _allocate(self, model: EchoModel, tokenizer: ReportTokenizer) -> None:
        """The cache, the prefix, the masks a pass appends to its carried ids, and every pass's
        positions [n, feed], past length [n] and cache slots [n, width]."""
        md, lm, b, dev = self.mode, model.cfg.lm, self.cfg.batch, self.device
        self.kc = torch.zeros(lm.num_hidden_layers, b, lm.num_key_value_heads, self.capacity, lm.head_dim,
                              dtype=self.dtype, device=dev)
        self.vc = torch.zeros_like(self.kc)
        ids = tokenizer.prefix_ids(model.n_image_tokens)
        self.prefix = torch.tensor(ids, dtype=torch.long, device=dev)[None].expand(b, -1).contiguous()
        self.masks = torch.full((b, md.feed - md.width), tokenizer.mask_id, dtype=torch.long, device=dev)
        self.prefill_graph = make_graph(md.prefill, model, self.capacity, md.prefix_len, tokenizer.mask_id).to(dev)
        self.positions = torch.stack([torch.from_numpy(md.positions(j)) for j in range(self.n_passes)]).to(dev)
        self.past_len = md.cached + md.width * torch.arange(self.n_passes, device=dev)
        self.slots = self.past_len[:, None] + torch.arange(md.width, device=dev)

    def _captured_step(self, step: torch.nn.Module) -> CapturedPass:
        """The step graph and its cache write as one pass over static inputs."""
        names, b = self.mode.step_outputs, self.cfg.batch

        def one_pass(input_ids, position_ids, past_len, slots):
            out = dict(zip(names, step(input_ids, position_ids, self.kc, self.vc, past_len)))
            self._write(out["present_key"], out["present_value"], slots)
            return out["tokens"]

        example = {"input_ids": torch.full((b, self.mode.feed), self.tok.mask_id, dtype=torch.long, device=self.device),
                   "position_ids": self.positions[0].expand(b, -1).contiguous(),
                   "past_len": self.past_len[0].expand(b).contiguous(), "slots": self.slots[0].clone()}
        return CapturedPass(one_pass, example, self.capture)

    def _write(self, pk: torch.Tensor, pv: torch.Tensor, slots: torch.Tensor) -> None:
        self.kc.index_copy_(3, slots, pk.to(self.dtype))
        self.vc.index_copy_(3, slots, pv.to(self.dtype))

    def reset(self) -> None:
        """Zero the cache: slots past a pass's past length are masked out but still multiplied by
        zero weights, so they must be finite (after a capture's warm-up they hold its writes)."""
        self.kc.zero_()
        self.vc.zero_()

    @torch.no_grad()
    def prefill(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The prefix's KV into the cache; returns what the first pass carries: the prefill's token 0
        (AR) or the prompt ids it did not store (fused: the last prompt block)."""
        self.reset()
        md = self.mode
        out = dict(zip(md.prefill_outputs, self.prefill_graph(pixel_values.to(self.device, self.dtype), self.prefix)))
        self._write(out["present_key"], out["present_value"], torch.arange(md.cached, device=self.device))
        return out["tokens"] if md.prefill_ids else self.prefix[:, md.cached : md.cached + md.width]

    @torch.no_grad()
    def decode(self, carry: torch.Tensor) -> DecodeResult:
        """Every pass after the prefill: one captured pass each."""
        b, eos = self.cfg.batch, self.tok.eos_id
        written = [carry] if self.mode.prefill_ids else []
        done = holds_eos(carry, eos) if written else torch.zeros(b, dtype=torch.bool, device=self.device)
        for j in range(self.n_passes):
            if self.cfg.stop_at_eos and bool(done.all()):  # a host sync per pass: what a serving loop does too
                break
            carry = self.step(input_ids=torch.cat([carry, self.masks], 1), position_ids=self.positions[j].expand(b, -1),
                              past_len=self.past_len[j].expand(b), slots=self.slots[j]).clone()
            written.append(carry)
            if self.cfg.stop_at_eos:
                done |= holds_eos(carry, eos)
        raw = torch.cat(written, 1).cpu()
        return DecodeResult(cut_rows_at_eos(raw, eos), 1 + len(written) - self.mode.prefill_ids, raw)

    def generate(self, pixel_values: torch.Tensor) -> DecodeResult:
        return self.decode(self.prefill(pixel_values))
