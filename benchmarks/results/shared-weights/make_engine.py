"""A random-weight ECHO engine big enough for the weights to show in RSS (about 200 MB fp32).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/shared-weights/make_engine.py /tmp/sw
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/shared-weights/make_engine.py /tmp/sw8 --layers 8 --vocab 16000

Decoder d 768, 4 layers, 12/4 heads, MLP 2048, vocabulary 32,000 (tied embeddings), a 2-layer ViT
at 64 px; fp32 and fp16 graphs, batch 1, no verification (random weights). The second form is
layer-heavy like a real LLM (8 layers, vocabulary 16,000: 80% of the weights in the layers,
against 49% in the first; Qwen2.5-0.5B has 62% in the layers, 23% in the embedding). The tokenizer is the
tests' tiny one: the model's vocabulary is larger than the tokenizer's, as in Qwen checkpoints.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main(root: Path, layers: int = 4, vocab: int = 32000, precisions=("fp32", "fp16")) -> None:
    import torch

    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
    from echo_train.model.echo_model import EchoModel
    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = EchoConfig(
        lm=LMConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                    num_attention_heads=12, num_key_value_heads=4, head_dim=64),
        vision=VisionConfig(image_size=64, patch_size=16, hidden_size=256, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=512),
        stage="dcd", block_size=8, max_response_tokens=48, shifted_prediction=True)
    model = EchoModel(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.1f}M parameters, {4 * n / 1e6:.0f} MB fp32")
    save_checkpoint(root / "ckpt", model, tok)
    t = time.perf_counter()
    build(BuildOptions(ckpt=root / "ckpt", out=root / "engine", precisions=list(precisions), verify_n=0, force=True))
    print(f"build {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--precisions", default="fp32,fp16")
    a = ap.parse_args()
    main(a.root, a.layers, a.vocab, a.precisions.split(","))
