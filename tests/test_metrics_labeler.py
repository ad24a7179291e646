"""The CheXpert-style rule labeler and finding F1."""
from __future__ import annotations

import json

import pytest

from echo_train.metrics.finding_f1 import finding_f1, finding_f1_from_labels
from echo_train.metrics.labeler import (
    CHEXPERT_OBSERVATIONS, FIVE_OBSERVATIONS, label_report, split_sections,
)

# (report, {observation: expected label}); observations not listed must be None
# (No Finding is always checked).
CASES = [
    # negation
    ("No pleural effusion.", {"Pleural Effusion": 0, "No Finding": 1}),
    ("There is no pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("Lungs are clear without focal consolidation.", {"Lung Opacity": 0, "Consolidation": 0, "No Finding": 1}),
    ("Pneumothorax is not seen.", {"Pneumothorax": 0, "No Finding": 1}),
    ("The left pleural effusion has resolved.", {"Pleural Effusion": 0, "No Finding": 1}),
    ("Negative for pneumothorax.", {"Pneumothorax": 0, "No Finding": 1}),
    # a trigger's scope ends at "but" / a new clause
    ("No evidence of pneumonia, but there is bibasilar atelectasis.",
     {"Pneumonia": 0, "Atelectasis": 1, "Lung Opacity": 1, "No Finding": 0}),
    ("No pneumothorax is seen and the heart is enlarged.",
     {"Pneumothorax": 0, "Cardiomegaly": 1, "No Finding": 0}),
    # pseudo-negation
    ("No change in the moderate right pleural effusion.", {"Pleural Effusion": 1, "No Finding": 0}),
    # uncertainty
    ("Left basilar opacity may represent atelectasis.",
     {"Lung Opacity": 1, "Atelectasis": -1, "No Finding": 0}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1, "No Finding": 0}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": -1, "No Finding": 0}),
    ("Findings are concerning for pneumonia.", {"Pneumonia": -1, "No Finding": 0}),
    ("Possible atelectasis, no pneumonia.", {"Atelectasis": -1, "Pneumonia": 0, "No Finding": 0}),
    ("Borderline heart size.", {"Cardiomegaly": -1, "No Finding": 0}),
    # synonyms
    ("Enlarged cardiac silhouette.", {"Cardiomegaly": 1, "No Finding": 0}),
    ("The heart is moderately enlarged.", {"Cardiomegaly": 1, "No Finding": 0}),
    ("Heart size is normal.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("Heart size is not enlarged.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("ET tube terminates 4 cm above the carina.", {"Support Devices": 1, "No Finding": 1}),
    ("Right IJ central venous catheter tip in the SVC.", {"Support Devices": 1, "No Finding": 1}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1, "No Finding": 0}),
    ("The cardiomediastinal silhouette is within normal limits.",
     {"Enlarged Cardiomediastinum": 0, "Cardiomegaly": 0, "No Finding": 1}),
    ("Pulmonary vascular congestion.", {"Edema": 1, "Lung Opacity": 1, "No Finding": 0}),
    ("A 1 cm nodule in the right upper lobe.", {"Lung Lesion": 1, "No Finding": 0}),
    ("Healed right rib fractures.", {"Fracture": 1, "No Finding": 0}),
    ("No acute osseous abnormality.", {"Fracture": 0, "No Finding": 1}),
    ("Right apical pleural thickening.", {"Pleural Other": 1, "No Finding": 0}),
    ("Small pericardial effusion.", {"No Finding": 1}),  # not a pleural effusion
    ("Right lower lobe consolidation.", {"Consolidation": 1, "Lung Opacity": 1, "No Finding": 0}),
    # positive wins over negative across mentions (laterality)
    ("Small right pleural effusion. No left pleural effusion.", {"Pleural Effusion": 1, "No Finding": 0}),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_labeler_hand_written(text, expected):
    got = label_report(text)
    want = {o: expected.get(o) for o in CHEXPERT_OBSERVATIONS}
    assert got == want, {o: (got[o], want[o]) for o in CHEXPERT_OBSERVATIONS if got[o] != want[o]}


def test_labeler_sections():
    rep = ("INDICATION: Evaluate for pneumonia. HISTORY: Pleural effusion. COMPARISON: None. "
           "FINDINGS: The lungs are clear. IMPRESSION: No acute cardiopulmonary process.")
    got = label_report(rep)
    assert got["Pneumonia"] is None and got["Pleural Effusion"] is None
    assert got["Lung Opacity"] == 0 and got["No Finding"] == 1
    # the same text without headers is read whole
    assert label_report("Evaluate for pneumonia.")["Pneumonia"] == 1
    # only the impression, when asked
    rep2 = "FINDINGS: Small left pleural effusion. IMPRESSION: Mild cardiomegaly."
    only_imp = label_report(rep2, sections=("impression",))
    assert only_imp["Pleural Effusion"] is None and only_imp["Cardiomegaly"] == 1
    names = [n for n, _ in split_sections(rep)]
    assert names == ["indication", "history", "comparison", "findings", "impression"]


def test_labeler_empty_and_hierarchy_switch():
    assert all(v is None for v in label_report("").values())
    assert label_report("Mild pulmonary edema.", opacity_hierarchy=False)["Lung Opacity"] is None


def test_labeler_every_grammar_sentence():
    grammar = pytest.importorskip("echo_train.data.synth.grammar")
    bad = []
    for sent in grammar.sentence_table():
        rep = sent + "."
        if label_report(rep) != grammar.report_labels(rep):
            bad.append(sent)
    assert not bad, bad[:10]


def test_labeler_agrees_with_synthetic_ground_truth(tmp_path):
    """Acceptance: >= 99% agreement on (study, observation) pairs of a synthetic test split."""
    synth = pytest.importorskip("echo_train.data.synth")
    from echo_train.data.study import format_report

    synth.generate_synth(tmp_path, n_train=10, n_val=10, n_test=300, image_size=32, seed=1, workers=1)
    recs = json.loads((tmp_path / "test.json").read_text())
    agree = total = 0
    for r in recs:
        got = label_report(format_report(r["ground_truth"]["findings"], r["ground_truth"]["impression"]))
        for o in CHEXPERT_OBSERVATIONS:
            total += 1
            agree += got[o] == r["labels"][o]
    assert total == 300 * 14
    assert agree / total >= 0.99, agree / total


def test_finding_f1_known_values():
    P = {"a": "Cardiomegaly. Small left pleural effusion.",   # TP cardio, TP effusion
         "b": "No pleural effusion. Mild pulmonary edema.",   # FP edema (+FP lung opacity)
         "c": "Heart size is normal."}                        # FN cardiomegaly
    R = {"a": "The heart is enlarged. Left pleural effusion.",
         "b": "No acute process.",
         "c": "Mild cardiomegaly."}
    out = finding_f1(P, R)
    # pooled over 14: TP=2 (cardio a, effusion a), FP=2 (edema b, lung opacity b), FN=1 (cardio c)
    # plus No Finding: pred b,c = 0,1 ; ref b,c = 1,0 -> TP 0, FP 1 (c), FN 1 (b)
    assert out["per_observation"]["Cardiomegaly"] == {"f1": pytest.approx(2 / 3), "tp": 1, "fp": 0, "fn": 1,
                                                      "support": 2}
    tp, fp, fn = 2, 3, 2
    assert out["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # 5 observations: cardio (tp1, fn1), effusion (tp1), edema (fp1)
    assert out["micro_f1_5"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert out["macro_f1_5"] == pytest.approx((2 / 3 + 1 + 0 + 0 + 0) / 5)
    assert out["n"] == 3


def test_finding_f1_identical_and_uncertain():
    refs = ["Cardiomegaly. Right pleural effusion.", "Possible pneumonia.", "Normal chest."]
    perfect = finding_f1(refs, refs)
    assert perfect["micro_f1"] == 1.0 and perfect["micro_f1_5"] == 1.0
    lp = [{"Pneumonia": -1}]
    lr = [{"Pneumonia": 1}]
    assert finding_f1_from_labels(lp, lr)["micro_f1"] == 0.0
    assert finding_f1_from_labels(lp, lr, uncertain_as_positive=True)["micro_f1"] == 1.0
    assert FIVE_OBSERVATIONS == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    with pytest.raises(KeyError):
        finding_f1({"x": "a"}, {"y": "b"})
