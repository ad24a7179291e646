"""BLEU / ROUGE / METEOR / CIDEr with hand-computed values; identical reports score the maximum."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from echo_train.metrics import text_overlap as tx

HYP = "The cat sat on the mat."
REF = "the cat is on the mat"


def test_tokenize_drops_punctuation_and_case():
    assert tx.tokenize("No Pleural Effusion. IMPRESSION: normal!") == ["no", "pleural", "effusion", "impression",
                                                                         "normal"]


def test_bleu_hand_computed():
    b = tx.bleu([HYP], [REF])["corpus"]
    # unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3, equal lengths (BP = 1)
    assert b["bleu1"] == pytest.approx(5 / 6)
    assert b["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b["bleu4"] < 1e-3


def test_bleu_brevity_penalty_and_corpus_pooling():
    b = tx.bleu(["the cat"], [REF])["corpus"]
    assert b["bleu1"] == pytest.approx(math.exp(1 - 6 / 2))
    # corpus BLEU pools counts: two halves of one long pair give the pair's value
    two = tx.bleu([HYP, "a b c d"], [REF, "a b c d"])["corpus"]["bleu1"]
    assert two == pytest.approx((5 + 4) / (6 + 4))


def test_bleu_matches_pycocoevalcap():
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    P = ["the heart is enlarged . no effusion", "there is a small left pleural effusion", "no pneumothorax"]
    R = ["the heart is mildly enlarged . no pleural effusion", "small left pleural effusion is present",
         "there is no pneumothorax"]
    ours = tx.bleu(P, R)["corpus"]
    gts = {i: [tx.tokenized(r)] for i, r in enumerate(R)}
    res = {i: [tx.tokenized(p)] for i, p in enumerate(P)}
    theirs, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(theirs, rel=1e-9)


def test_rouge_hand_computed():
    r = tx.rouge([HYP], [REF])["corpus"]
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)  # LCS "the cat on the mat"


def test_identical_reports_score_the_maximum():
    refs = ["the heart size is normal. there is no pleural effusion or pneumothorax.",
            "there is a small left pleural effusion. mild cardiomegaly is present.",
            "an endotracheal tube is in standard position. the lungs are clear."]
    b = tx.bleu(refs, refs)["corpus"]
    assert all(v == pytest.approx(1.0) for v in b.values())
    assert all(v == pytest.approx(1.0) for v in tx.rouge(refs, refs)["corpus"].values())
    c = tx.cider(refs, refs)
    assert c["corpus"]["cider"] == pytest.approx(10.0)
    other = tx.cider(refs[1:] + refs[:1], refs)["corpus"]["cider"]
    assert other < 10.0


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_identical_and_empty():
    refs = ["there is a small left pleural effusion", "the heart is mildly enlarged"]
    same = tx.meteor(refs, refs)
    assert same["corpus"]["meteor"] == pytest.approx(1.0, abs=1e-3)
    diff = tx.meteor(["", "the heart is enlarged"], refs)
    assert diff["per_study"]["meteor"][0] == 0.0
    assert 0 < diff["per_study"]["meteor"][1] < 1


def test_meteor_not_computed_without_java(monkeypatch):
    monkeypatch.setattr(tx, "_METEOR", None)
    monkeypatch.setattr(tx.shutil, "which", lambda name: None)
    with pytest.raises(tx.MeteorUnavailable, match="java"):
        tx.meteor(["a"], ["a"])


def test_empty_inputs():
    assert tx.bleu([], [])["per_study"]["bleu1"].shape == (0,)
    assert np.isfinite(tx.bleu([""], ["a b"])["corpus"]["bleu1"])
