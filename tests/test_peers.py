"""The peer benchmark (benchmarks/peers.py): the Hugging Face decoder folder it hands the peers holds
our decoder exactly, a missing peer is skipped with the reason, and the table's goal ratios come
from the rows. The peers' own runs are not part of `make test` (their wheels are an optional
extra); the test that runs them skips, saying why, where they are not installed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks import peers  # noqa: E402


@pytest.fixture(scope="module")
def echo_ckpt(tmp_path_factory) -> Path:
    """A tiny random ECHO checkpoint (Qwen2 decoder, tied embeddings, q/k/v biases) with non-trivial
    norms and biases, so that every tensor's name and value matter."""
    from echo_train.model.checkpoint import save_checkpoint
    from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
    from echo_train.model.echo_model import EchoModel
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = EchoConfig(lm=LMConfig(vocab_size=max(320, tok.vocab_size), hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 rope_theta=1e6, max_position_embeddings=256),
                     vision=VisionConfig(), stage="dcd", block_size=4)
    model = EchoModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("peers") / "ckpt"
    save_checkpoint(out, model, tok)
    return out


def test_hf_decoder_folder_computes_our_decoder(echo_ckpt, tmp_path):
    """transformers' Qwen2ForCausalLM on the written folder gives our decoder's logits, and its
    tokenizer is Qwen2's layout with the end-of-text id in the config."""
    from echo_train.model.checkpoint import load_checkpoint

    hf = peers.write_hf_decoder(echo_ckpt, tmp_path / "hf", tokenizer_vocab=300)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM" and ref.config.tie_word_embeddings
    ours, _ = load_checkpoint(echo_ckpt)
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours.lm.causal_logits(ids)
        got = ref(input_ids=ids).logits
    assert (want - got).abs().max().item() < 1e-4
    cfg = json.loads((hf / "config.json").read_text())
    tok = json.loads((hf / "tokenizer.json").read_text())
    assert cfg["eos_token_id"] == next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    assert cfg["rope_theta"] == 1e6


def test_a_missing_peer_is_skipped_with_the_reason(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "onnxruntime_genai":
            raise ImportError("No module named 'onnxruntime_genai'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    why = peers.missing_peers()["onnxruntime-genai"]
    assert why and "onnxruntime_genai not importable" in why and "[peers]" in why
    assert any(r.startswith("onnxruntime-genai") for r in peers._extra_requirements())


def _res(rows):
    meta = {"rung": "qwen2.5-0.5b", "note": "n", "context_tokens": 224, "new_tokens": 128, "threads": 2, "repeats": 3,
            "skipped": {"llama.cpp": "llama_cpp not importable"}, "machine": {"cpu": "x"}, "cpu_flags": ["avx2"],
            "loadavg_before": "1 1 1", "loadavg_after": "1 1 1", "date": "d", "command": "c"}
    return {"meta": meta, "rows": rows}


def _ours(prec, ar, fused):
    loop = lambda tps: {"decode_tokens_per_s": tps, "runs_tokens_per_s": [tps], "new_tokens": 128, "forward_passes": 10,  # noqa: E731
                        "rss_mb": 1000.0}
    return {"engine": "ours", "precision": prec, "block_size": 8, "fused": loop(fused), "ar": loop(ar),
            "t_ar_step_ms": 10.0, "t_block_step_ms": 20.0, "weight_bytes": 10**9}


def _peer(engine, prec, tps):
    return {"engine": engine, "precision": prec, "decode_tokens_per_s": tps, "runs_tokens_per_s": [tps], "new_tokens": 128,
            "decode_s": 128 / tps, "rss_mb": 500.0, "weight_bytes": 10**8, "version": "1"}


def test_goal_ratios_come_from_the_rows():
    """Our AR against the best peer of its precision class, one-step against the best peer of all,
    a failed probe listed and the skipped peer named under the table."""
    res = _res([_ours("fp32", 15.0, 60.0), _ours("int8w", 40.0, 100.0), _ours("int8dyn", 42.0, 120.0),
                _peer("onnxruntime-genai", "fp32", 17.0), _peer("llama.cpp", "f32", 16.0),
                _peer("onnxruntime-genai", "int8", 40.0), _peer("llama.cpp", "Q8_0", 44.0),
                _peer("onnxruntime-genai", "int4", 55.0), {"engine": "llama.cpp", "precision": "Q4_K_M", "failed": "probe exit 1"}])
    v = peers.verdicts(peers.table_rows(res))
    assert v["classes"]["fp32"]["best_peer"] == "onnxruntime-genai 1 fp32"
    assert v["classes"]["fp32"]["ar_over_peer"] == pytest.approx(15 / 17)
    c8 = v["classes"]["8-bit"]  # our fastest 8-bit engine, AR and one-step each
    assert c8["our_ar_precision"] == "int8dyn" and c8["ar_over_peer"] == pytest.approx(42 / 44)
    assert c8["one_step_over_peer"] == pytest.approx(120 / 44)
    assert "4-bit" not in v["classes"]  # no int4 row of ours
    assert v["one_step_best"]["precision"] == "int8dyn" and v["one_step_best"]["over_best_peer"] == pytest.approx(120 / 55)
    md = peers.markdown(res)
    assert "Decode phase only" in md and "failed: probe exit 1" in md and "llama.cpp: llama_cpp not importable" in md
    assert "**2.18x** (goal >= 2.5x)" in md and "our AR (int8dyn) 42.0 tok/s" in md


@pytest.mark.skipif(peers.missing_peers()["onnxruntime-genai"] is not None,
                    reason=f"onnxruntime-genai: {peers.missing_peers()['onnxruntime-genai']}")
def test_genai_peer_decodes_what_transformers_decodes(echo_ckpt, tmp_path):
    """The genai fp32 model built from the folder by its model builder decodes greedily the tokens
    transformers decodes (the same decoder), through the probe the benchmark runs."""
    hf = peers.write_hf_decoder(echo_ckpt, tmp_path / "hf", tokenizer_vocab=300)
    g = peers.build_genai(hf, tmp_path / "genai", "fp32", 1)
    import onnxruntime_genai as og

    prompt = np.random.default_rng(0).integers(3, 300, 12).tolist()
    params = og.GeneratorParams(og_model := og.Model(og.Config(str(g))))
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    got = list(gen.get_sequence(0))[len(prompt):]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt):]
    assert got == want.tolist()[: len(got)] and len(got) >= 1
    res = peers.probe_genai(g, prompt, 8, 1)
    assert res["new_tokens"] == 8 and res["decode_tokens_per_s"] > 0 and res["weight_bytes"] > 0


def test_rounds_reduce_to_the_median_round():
    """Each engine's row is its median round (ours: per loop), every round's tokens/s kept."""
    rounds = [_ours("int4", ar, fused) for ar, fused in ((10.0, 50.0), (30.0, 40.0), (20.0, 60.0))]
    for r, t in zip(rounds, (5.0, 7.0, 6.0)):
        r["t_ar_step_ms"] = t
    m = peers._median_round(rounds, "ours")
    assert (m["ar"]["decode_tokens_per_s"], m["fused"]["decode_tokens_per_s"], m["t_ar_step_ms"]) == (20.0, 50.0, 6.0)
    assert sorted(m["ar"]["runs_tokens_per_s"]) == [10.0, 20.0, 30.0] and m["rounds"] == 3
    p = peers._median_round([_peer("llama.cpp", "Q8_0", t) for t in (3.0, 1.0, 2.0)], "llama.cpp")
    assert p["decode_tokens_per_s"] == 2.0 and p["runs_tokens_per_s"] == [3.0, 1.0, 2.0]
