"""Real checkpoints work: our decoder loads Hugging Face Qwen2/Qwen3 folders and matches `transformers`."""
import pytest
import torch

from echo_train.model.errors import CheckpointError
from echo_train.model.pretrained import load_qwen_decoder

transformers = pytest.importorskip("transformers")


def _tiny(kind):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True)
    return transformers.Qwen3ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_logits_match_transformers(tmp_path, kind):
    torch.manual_seed(0)
    ref = _tiny(kind).eval()
    with torch.no_grad():  # random non-trivial norms and biases so every parameter matters
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_qwen_decoder(tmp_path)
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours.causal_logits(ids)
    assert (want - got).abs().max().item() < 1e-4


def test_missing_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, '
                                          '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_qwen_decoder(tmp_path)
