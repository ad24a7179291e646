"""Qwen2 / Qwen2.5 / Qwen3 causal LMs (`echo-train stage1 --init-lm`): the decoder ECHO's own models
are built on (backbone.QwenDecoder), whose tensor names are the folder's own."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LMConfig
from ..errors import PretrainedError
from ..hf_folder import EMBEDDING_ROWS, grow_rows, load_mapped, read_tensors, weight_files
from .base import Family


def decoder_config(text: dict[str, Any], *, rope_theta: float, tie: bool, max_positions: int, qk_norm: bool = False,
                   attention_bias: bool = True, **more: Any) -> LMConfig:
    """LMConfig of a Qwen decoder's config.json settings (`text`); what the families set apart
    (rope, tying, Qwen3's norms, Qwen2.5-VL's MRoPE sections in `more`) given by the caller."""
    heads = int(text["num_attention_heads"])
    return LMConfig(
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]), num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(text.get("num_key_value_heads", heads)),
        head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads), rope_theta=rope_theta,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), qk_norm=qk_norm, attention_bias=attention_bias,
        tie_word_embeddings=tie, max_position_embeddings=int(text.get("max_position_embeddings", max_positions)),
        **more)


class Qwen2(Family):
    name = "qwen2"
    title = "Qwen2, Qwen2.5 or Qwen3 causal LM"
    model_types = ("qwen2", "qwen3")
    taken_by = "--init-lm"
    command = "echo-train stage1 --init-lm"

    def lm_config(self, d: dict[str, Any]) -> LMConfig:
        """From a Hugging Face Qwen2/Qwen3 config.json dict (KeyError where a setting is missing)."""
        mt = d.get("model_type", "qwen2")
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return decoder_config(d, rope_theta=float(theta), tie=bool(d.get("tie_word_embeddings", False)),
                              max_positions=2048, qk_norm=mt == "qwen3",  # Qwen3 normalises q and k per head
                              attention_bias=bool(d.get("attention_bias", mt == "qwen2")))  # Qwen3 has no biases

    def config_of(self, folder: Path, d: dict[str, Any]) -> LMConfig:
        """lm_config of the folder's config.json `d`, a missing setting refused naming the file."""
        try:
            return self.lm_config(d)
        except (KeyError, TypeError, ValueError) as e:
            raise PretrainedError(f"{folder / 'config.json'}: incomplete {d.get('model_type')} configuration "
                                  f"(missing {e})") from None

    def decoder_state(self, folder: Path, cfg: LMConfig, rows: int) -> dict[str, torch.Tensor]:
        """The decoder's tensors by their (and our) names, the embedding (and an untied head) grown
        to `rows`; a tied head is the embedding, loaded once by that name."""
        state = read_tensors(weight_files(folder), keep=lambda n: "rotary_emb" not in n)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        for name in EMBEDDING_ROWS:
            if name in state:
                state[name] = grow_rows(state[name], rows)
        return state

    def load_decoder_weights(self, decoder: nn.Module, folder: Path, cfg: LMConfig) -> None:
        """The folder's weights into a backbone.QwenDecoder of `cfg` (its rows may outnumber the folder's)."""
        tied = cfg.tie_word_embeddings
        own = {k: v for k, v in decoder.state_dict().items() if not (tied and k == "lm_head.weight")}
        load_mapped(own, self.decoder_state(folder, cfg, cfg.vocab_size), folder,
                    f"a {cfg.num_hidden_layers}-layer Qwen decoder")


FAMILY = Qwen2()
