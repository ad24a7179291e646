"""evaluate_reports (bootstrap, not-computed paths, JSON/markdown), sentence validity and the
echo-eval CLI end to end on small JSONL files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from echo_train.metrics.cli import main, read_reports
from echo_train.metrics.bootstrap import bootstrap_ci
from echo_train.metrics.report import EvalConfig, evaluate_reports

REFS = {
    "s1": "FINDINGS: The heart is mildly enlarged. There is a small left pleural effusion. "
          "IMPRESSION: Mild cardiomegaly. Small left pleural effusion.",
    "s2": "FINDINGS: The lungs are clear. There is no pleural effusion or pneumothorax. "
          "IMPRESSION: No acute cardiopulmonary process.",
    "s3": "FINDINGS: There is right lower lobe consolidation. An endotracheal tube is in standard position. "
          "IMPRESSION: Right lower lobe consolidation concerning for pneumonia.",
    "s4": "FINDINGS: There is mild pulmonary edema. Heart size is normal. IMPRESSION: Mild pulmonary edema.",
}
PREDS = {
    "s1": "FINDINGS: The heart is enlarged. No pleural effusion. IMPRESSION: Cardiomegaly.",
    "s2": "FINDINGS: The lungs are clear. No pneumothorax. IMPRESSION: No acute cardiopulmonary process.",
    "s3": "FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia.",
    "s4": "FINDINGS: Mild pulmonary edema. IMPRESSION: Mild pulmonary edema.",
}
CHEAP = ["finding_f1", "bleu", "rouge", "cider"]


def test_evaluate_reports_scores_cis_and_per_study():
    res = evaluate_reports(PREDS, REFS, metrics=CHEAP, config=EvalConfig(n_boot=200, seed=3))
    assert res.ids == list(PREDS) and res.n == 4
    for name in CHEAP:
        m = res[name]
        assert m.computed, m.reason
        for k, (lo, hi) in m.ci.items():
            assert lo <= hi
        for k, v in m.per_study.items():
            assert len(v) == 4
    b = res["bleu"]
    assert b.ci["bleu1"][0] <= b.scores["bleu1"] <= b.ci["bleu1"][1]
    # seeded: same CIs twice; another seed: different
    again = evaluate_reports(PREDS, REFS, metrics=["bleu"], config=EvalConfig(n_boot=200, seed=3))
    assert again["bleu"].ci == b.ci
    other = evaluate_reports(PREDS, REFS, metrics=["bleu"], config=EvalConfig(n_boot=200, seed=4))
    assert other["bleu"].ci != b.ci
    # identical reports: every overlap metric at its maximum
    same = evaluate_reports(REFS, REFS, metrics=CHEAP, config=EvalConfig(n_boot=0))
    s = same.summary()
    assert s["bleu4"] == pytest.approx(1.0) and s["rougeL"] == pytest.approx(1.0)
    assert s["finding_micro_f1"] == 1.0 and s["cider"] == pytest.approx(10.0)


def test_not_computed_metrics_are_reported_never_substituted(tmp_path):
    res = evaluate_reports(PREDS, REFS, metrics=["ratescore", "chexbert_f1", "cls_cosine", "embedding_cosine"],
                           config=EvalConfig(n_boot=10))
    for name in ("ratescore", "chexbert_f1", "cls_cosine", "embedding_cosine"):
        assert not res[name].computed
        assert res[name].status.startswith("not computed: ")
        assert res.summary()[name] == res[name].status
    missing = evaluate_reports(PREDS, REFS, metrics=["ratescore"],
                               config=EvalConfig(ratescore_ner=str(tmp_path), ratescore_biolord=str(tmp_path)))
    assert "not computed" in missing["ratescore"].status
    md = res.to_markdown()
    assert "| ratescore | not computed: " in md
    d = json.loads(res.to_json())
    assert d["metrics"]["chexbert_f1"]["status"].startswith("not computed")


def test_mismatched_ids_and_unknown_metric():
    with pytest.raises(KeyError, match="no reference"):
        evaluate_reports({"x": "a", **PREDS}, REFS, metrics=["bleu"])
    with pytest.raises(KeyError, match="no prediction"):
        evaluate_reports({"s1": PREDS["s1"]}, REFS, metrics=["bleu"])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_reports(PREDS, REFS, metrics=["bleurt"])


def test_bootstrap_ci_of_a_mean():
    x = np.arange(100, dtype=float)
    lo, hi = bootstrap_ci(lambda idx: {"m": x[idx].mean()}, 100, 500, 0)["m"]
    assert lo < 49.5 < hi and hi - lo < 25


def test_sentence_validity_on_grammar():
    grammar = pytest.importorskip("echo_train.data.synth.grammar")
    from echo_train.metrics.validity import sentence_validity

    good = ("FINDINGS: there is a small left pleural effusion. the heart size is normal. "
            "IMPRESSION: small left pleural effusion.")
    assert all(grammar.is_valid_sentence(s) for s in grammar.split_sentences(good))
    mean_field = "no is no evidence of left pleural no . pleural right pleural effusion is is ."
    repeated = "FINDINGS: there is no pleural effusion. no pleural effusion is seen."
    contradictory = "FINDINGS: there is no pleural effusion. IMPRESSION: small left pleural effusion."
    attr_clash = "FINDINGS: there is a small left pleural effusion. IMPRESSION: large left pleural effusion."
    out = sentence_validity({"a": good, "b": mean_field, "c": repeated, "d": contradictory, "e": attr_clash})
    assert out["n_reports"] == 5 and out["n_sentences"] == 3 + 2 + 2 + 2 + 2
    assert out["valid_sentence_rate"] == pytest.approx(9 / 11)
    assert out["valid_report_rate"] == pytest.approx(4 / 5)
    assert out["repeat_rate"] == pytest.approx(1 / 5)
    assert out["contradiction_rate"] == pytest.approx(2 / 5)
    assert out["repeat_or_contradiction_rate"] == pytest.approx(3 / 5)
    res = evaluate_reports({"a": good, "b": mean_field}, {"a": good, "b": good}, metrics=["validity"],
                           config=EvalConfig(n_boot=50))
    assert res["validity"].scores["valid_report_rate"] == 0.5
    assert res["validity"].per_study["valid_sentence_share"] == [1.0, 0.0]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_end_to_end(tmp_path):
    pred = tmp_path / "preds.jsonl"
    ref = tmp_path / "refs.jsonl"
    _write_jsonl(pred, [{"id": k, "report": v} for k, v in PREDS.items()])
    # references as separate sections, in another order
    rows = []
    for k in reversed(list(REFS)):
        f, i = REFS[k].split("IMPRESSION:")
        rows.append({"id": k, "findings": f.replace("FINDINGS:", "").strip(), "impression": i.strip()})
    _write_jsonl(ref, rows)
    assert read_reports(ref)["s1"] == REFS["s1"]
    out, md = tmp_path / "out" / "metrics.json", tmp_path / "metrics.md"
    r = CliRunner().invoke(main, ["--pred", str(pred), "--ref", str(ref), "--out", str(out),
                                  "--metrics", "finding_f1,bleu,rouge,cider,ratescore", "--n-boot", "50",
                                  "--markdown", str(md), "--quiet"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["n"] == 4 and set(d["ids"]) == set(PREDS)
    assert 0 < d["summary"]["bleu1"] <= 1
    assert d["summary"]["ratescore"].startswith("not computed: ")
    assert len(d["metrics"]["rouge"]["per_study"]["rougeL"]) == 4
    assert "| finding_micro_f1 |" in md.read_text()


def test_cli_errors(tmp_path):
    ref = tmp_path / "refs.jsonl"
    _write_jsonl(ref, [{"id": k, "report": v} for k, v in REFS.items()])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "s1", "report": "ok"}\n{"id": "s2", "report": \n')
    r = CliRunner().invoke(main, ["--pred", str(bad), "--ref", str(ref), "--out", str(tmp_path / "o.json")])
    assert r.exit_code != 0 and "bad.jsonl:2: bad JSON" in r.output
    short = tmp_path / "short.jsonl"
    _write_jsonl(short, [{"id": "s1", "report": "x"}, {"id": "zz", "report": "y"}])
    r = CliRunner().invoke(main, ["--pred", str(short), "--ref", str(ref), "--out", str(tmp_path / "o.json"),
                                  "--metrics", "bleu"])
    assert r.exit_code != 0 and "ids do not match" in r.output and "'zz'" in r.output
    noid = tmp_path / "noid.jsonl"
    _write_jsonl(noid, [{"report": "x"}])
    r = CliRunner().invoke(main, ["--pred", str(noid), "--ref", str(ref), "--out", str(tmp_path / "o.json")])
    assert r.exit_code != 0 and 'no "id" field' in r.output
    r = CliRunner().invoke(main, ["--pred", str(ref), "--ref", str(ref), "--out", str(tmp_path / "o.json"),
                                  "--metrics", "bleu,nope"])
    assert r.exit_code != 0 and "unknown metric" in r.output


def test_paired_f1_difference():
    from echo_train.metrics import finding_f1
    from echo_train.metrics.finding_f1 import paired_micro_f1_difference

    d = paired_micro_f1_difference(PREDS, REFS, REFS, n_boot=300, seed=1)
    assert d["n"] == 4
    assert d["delta"] == pytest.approx(finding_f1(PREDS, REFS)["micro_f1"] - 1.0)
    lo, hi = d["ci95"]
    assert lo <= d["delta"] <= hi <= 0.0  # the references score 1.0 on every resample
    # a system against itself differs by exactly zero on every resample
    same = paired_micro_f1_difference(PREDS, dict(PREDS), REFS, n_boot=50)
    assert same["delta"] == 0.0 and same["ci95"] == (0.0, 0.0)
    assert paired_micro_f1_difference(PREDS, PREDS, REFS, n_boot=0)["ci95"] is None
    with pytest.raises(KeyError):
        paired_micro_f1_difference(PREDS, {"s1": PREDS["s1"]}, REFS)
