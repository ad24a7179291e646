"""Greedy autoregressive decoding with a KV cache (the baseline)."""
from __future__ import annotations

import torch

from runtime.schedule import cut_rows_at_eos
from runtime.text import ReportTokenizer

from ..model.echo_model import EchoModel
from ..model.masks import causal_layout
from .common import DecodeResult, KVCache, forward_with_cache, never_predict_mask, prefix_ids_tensor


def ar_generate(model: EchoModel, tokenizer: ReportTokenizer, pixel_values: torch.Tensor, max_new_tokens: int = 128) -> DecodeResult:
    with torch.no_grad():
        b, dev = pixel_values.shape[0], pixel_values.device
        prefix = prefix_ids_tensor(tokenizer, model, b, dev)
        p = prefix.shape[1]
        cache = KVCache()
        logits, kv = forward_with_cache(model, model.embed_prefix(pixel_values, prefix), causal_layout(p), cache)
        cache.append(kv, causal_layout(p))
        passes = 1
        tok = never_predict_mask(logits[:, -1], tokenizer.mask_id).argmax(-1)
        out = [tok]
        done = tok == tokenizer.eos_id
        for i in range(1, max_new_tokens):
            if bool(done.all()):
                break
            layout = causal_layout(1, start=p + i - 1)
            logits, kv = forward_with_cache(model, model.embed_tokens(tok[:, None]), layout, cache)
            cache.append(kv, layout)
            passes += 1
            tok = never_predict_mask(logits[:, -1], tokenizer.mask_id).argmax(-1)
            out.append(tok)
            done |= tok == tokenizer.eos_id
        raw = torch.stack(out, 1).cpu()
        return DecodeResult(cut_rows_at_eos(raw, tokenizer.eos_id), passes, raw)
