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
from runtime import graph_io as gio
from runtime.schedule import BlockLayout, cut_rows_at_eos, holds_eos
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


class _Static:
    """What both loops share: the prefix, the cache buffers, the device."""

    def __init__(self, model: EchoModel, tokenizer: ReportTokenizer, cfg: StaticDecodeConfig, capacity: int) -> None:
        self.model, self.tok, self.cfg = model.eval(), tokenizer, cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.capture = cfg.cuda_graphs and self.device.type == "cuda"
        lm = model.cfg.lm
        b = cfg.batch
        self.kc = torch.zeros(lm.num_hidden_layers, b, lm.num_key_value_heads, capacity, lm.head_dim,
                              dtype=self.dtype, device=self.device)
        self.vc = torch.zeros_like(self.kc)
        self.capacity = capacity
        ids = tokenizer.prefix_ids(model.n_image_tokens)
        self.prefix = torch.tensor(ids, dtype=torch.long, device=self.device)[None].expand(b, -1).contiguous()

    def _write(self, pk: torch.Tensor, pv: torch.Tensor, slots: torch.Tensor) -> None:
        self.kc.index_copy_(3, slots, pk.to(self.dtype))
        self.vc.index_copy_(3, slots, pv.to(self.dtype))

    def reset(self) -> None:
        """Zero the cache: slots past a pass's past length are masked out but still multiplied by
        zero weights, so they must be finite (after a capture's warm-up they hold its writes)."""
        self.kc.zero_()
        self.vc.zero_()


class StaticFusedDecoder(_Static):
    """Fused one-step decoding (the semantics of fused_onestep_generate) over BlockStepGraph."""

    def __init__(self, model: EchoModel, tokenizer: ReportTokenizer, cfg: StaticDecodeConfig) -> None:
        B = model.cfg.block_size
        grid = BlockLayout(len(tokenizer.prefix_ids(model.n_image_tokens)), B)
        if grid.tail or model.cfg.decode_layout != "echo":
            raise NotImplementedError("the CUDA-graph decoder follows ECHO's own layout (a prompt in whole blocks, the "
                                      "mask token excluded); decode imported checkpoints with fused_onestep_generate")
        self.grid, self.B, self.n_blocks = grid, B, grid.num_blocks(cfg.max_new_tokens)
        super().__init__(model, tokenizer, cfg, grid.fused_prefill_len + self.n_blocks * B)
        b, dev = cfg.batch, self.device
        self.prefill_graph = make_graph(gio.VISION_PREFILL, model, self.capacity, grid.prefix_len,
                                        tokenizer.mask_id).to(dev)
        step = make_graph(gio.BLOCK_STEP, model, self.capacity, grid.prefix_len, tokenizer.mask_id).to(dev)
        self.positions = torch.stack([torch.from_numpy(grid.fused_positions(k)) for k in range(self.n_blocks)]).to(dev)
        self.past_len = grid.fused_prefill_len + B * torch.arange(self.n_blocks, device=dev)
        self.slots = self.past_len[:, None] + torch.arange(B, device=dev)
        self.masks = torch.full((b, B), tokenizer.mask_id, dtype=torch.long, device=dev)

        def block_pass(input_ids, position_ids, past_len, slots):
            tokens, _conf, pk, pv = step(input_ids, position_ids, self.kc, self.vc, past_len)
            self._write(pk, pv, slots)
            return tokens

        example = {"input_ids": torch.cat([self.prefix[:, -B:], self.masks], 1),
                   "position_ids": self.positions[0].expand(b, -1).contiguous(),
                   "past_len": self.past_len[0].expand(b).contiguous(), "slots": self.slots[0].clone()}
        with torch.no_grad():
            self.step = CapturedPass(block_pass, example, self.capture)

    @torch.no_grad()
    def prefill(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The prefix's first P - B tokens into the cache; returns the first pass's previous block."""
        self.reset()
        pk, pv = self.prefill_graph(pixel_values.to(self.device, self.dtype), self.prefix)
        n = self.grid.fused_prefill_len
        self._write(pk, pv, torch.arange(n, device=self.device))
        return self.prefix[:, n:]

    @torch.no_grad()
    def decode(self, prev: torch.Tensor) -> DecodeResult:
        """Every block after the prefill: one captured pass each."""
        b = self.cfg.batch
        blocks = []
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for k in range(self.n_blocks):
            prev = self.step(input_ids=torch.cat([prev, self.masks], 1),
                             position_ids=self.positions[k].expand(b, -1),
                             past_len=self.past_len[k].expand(b), slots=self.slots[k]).clone()
            blocks.append(prev)
            if self.cfg.stop_at_eos:
                done |= holds_eos(prev, self.tok.eos_id)
                if bool(done.all()):  # a host sync per pass: what a serving loop does too
                    break
        raw = torch.cat(blocks, 1).cpu()
        return DecodeResult(cut_rows_at_eos(raw, self.tok.eos_id), len(blocks) + 1, raw)

    def generate(self, pixel_values: torch.Tensor) -> DecodeResult:
        return self.decode(self.prefill(pixel_values))


class StaticArDecoder(_Static):
    """Greedy AR decoding (the semantics of ar_generate) over ArPrefillGraph + ArStepGraph."""

    def __init__(self, model: EchoModel, tokenizer: ReportTokenizer, cfg: StaticDecodeConfig) -> None:
        P = len(tokenizer.prefix_ids(model.n_image_tokens))
        self.P = P
        super().__init__(model, tokenizer, cfg, P + cfg.max_new_tokens)
        b, dev = cfg.batch, self.device
        self.prefill_graph = make_graph(gio.AR_PREFILL, model, self.capacity, P, tokenizer.mask_id).to(dev)
        step = make_graph(gio.AR_STEP, model, self.capacity, P, tokenizer.mask_id).to(dev)
        self.pos = P + torch.arange(cfg.max_new_tokens, device=dev)  # pass i writes the token at P + i - 1

        def ar_pass(input_ids, position_ids, past_len, slots):
            tok, pk, pv = step(input_ids, position_ids, self.kc, self.vc, past_len)
            self._write(pk, pv, slots)
            return tok

        example = {"input_ids": torch.zeros(b, 1, dtype=torch.long, device=dev),
                   "position_ids": self.pos[:1].expand(b, 1).contiguous(),
                   "past_len": self.pos[0].expand(b).contiguous(), "slots": self.pos[:1].clone()}
        with torch.no_grad():
            self.step = CapturedPass(ar_pass, example, self.capture)

    @torch.no_grad()
    def prefill(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.reset()
        tok, pk, pv = self.prefill_graph(pixel_values.to(self.device, self.dtype), self.prefix)
        self._write(pk, pv, torch.arange(self.P, device=self.device))
        return tok

    @torch.no_grad()
    def decode(self, tok: torch.Tensor) -> DecodeResult:
        b = self.cfg.batch
        out = [tok]
        done = tok[:, 0] == self.tok.eos_id
        for i in range(1, self.cfg.max_new_tokens):
            if self.cfg.stop_at_eos and bool(done.all()):
                break
            p = self.pos[i - 1 : i]
            tok = self.step(input_ids=tok, position_ids=p.expand(b, 1), past_len=p.expand(b), slots=p).clone()
            out.append(tok)
            if self.cfg.stop_at_eos:
                done |= tok[:, 0] == self.tok.eos_id
        raw = torch.cat(out, 1).cpu()
        return DecodeResult(cut_rows_at_eos(raw, self.tok.eos_id), len(out), raw)

    def generate(self, pixel_values: torch.Tensor) -> DecodeResult:
        return self.decode(self.prefill(pixel_values))
