"""Step-graph time at a real backbone's attention shapes, where the KV cache decides a step's cost.

The demo model (4 query / 2 kv heads, head_dim 32, a 256-token cache) is too small to show what a
decode step costs with a real backbone. This builds a randomly initialised model with
Qwen2.5-0.5B's attention shapes (14 query heads sharing 2 kv heads, head_dim 64, hidden 896) and
a few layers, exports its ar_step and block_step graphs at a long cache capacity, and times one
step of each on onnxruntime and in PyTorch eager (alternating back-to-back runs, median).

    python -m benchmarks.attention_shapes                       # 4 layers, capacity 1024, 1 thread
    python -m benchmarks.attention_shapes --layers 2 --capacity 2048 --threads 2
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class AttentionShapesConfig:
    layers: int = 4
    capacity: int = 1024
    threads: int = 1
    hidden: int = 896
    heads: int = 14
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 1024  # smaller than Qwen's 4864: the MLP does not touch the cache
    block_size: int = 8
    prefix_len: int = 32
    repeats: int = 20


def time_step_graphs(cfg: AttentionShapesConfig) -> dict[str, float]:
    """Milliseconds per call of "ort ar_step", "torch ar_step", "ort block_step", "torch block_step"."""
    import onnxruntime as ort
    import torch

    from echo_export.graphs import example_inputs, export_graph, make_graph
    from echo_export.timing import alternating_run_medians
    from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
    from echo_train.model.echo_model import EchoModel
    from runtime import graph_io

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model_cfg = EchoConfig(
        lm=LMConfig(vocab_size=1024, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                    num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                    head_dim=cfg.head_dim, max_position_embeddings=max(4096, 2 * cfg.capacity)),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64),
        stage="dcd", block_size=cfg.block_size, max_response_tokens=128, causal_context=True,
    )
    model = EchoModel(model_cfg).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = cfg.threads, 1
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role in (graph_io.AR_STEP, graph_io.BLOCK_STEP):
            graph = make_graph(role, model, cfg.capacity, cfg.prefix_len, mask_id=2)
            inputs = example_inputs(role, model_cfg, 1, cfg.capacity, cfg.prefix_len)
            path = Path(tmp) / f"{role}.onnx"
            export_graph(graph, inputs, path)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feeds = {name: t.numpy() for name, t in zip(graph.input_names, inputs)}
            calls[f"ort {role}"] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)

            def eager(graph=graph, inputs=inputs):
                with torch.no_grad():
                    graph(*inputs)

            calls[f"torch {role}"] = eager
        medians = alternating_run_medians(calls, cfg.repeats, warmup=5)
    return {name: 1e3 * s for name, s in medians.items()}


def main(argv: list[str] | None = None) -> None:
    d = AttentionShapesConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--capacity", type=int, default=d.capacity, help="KV cache capacity of the graphs")
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--repeats", type=int, default=d.repeats)
    a = ap.parse_args(argv)
    cfg = AttentionShapesConfig(layers=a.layers, capacity=a.capacity, threads=a.threads, repeats=a.repeats)
    print(f"{cfg.heads} query / {cfg.kv_heads} kv heads, head_dim {cfg.head_dim}, hidden {cfg.hidden}, "
          f"{cfg.layers} layers, capacity {cfg.capacity}, {cfg.threads} thread(s), batch 1")
    for name, ms in time_step_graphs(cfg).items():
        print(f"  {name:18s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
