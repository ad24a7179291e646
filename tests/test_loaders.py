"""Dataset loaders on tiny fixtures of every format (with bad records), and the training dataset."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echo_train.data.loaders import (
    detect_format, extract_findings_impression, load_chexpert_plus, load_echo_json, load_mimic_cxr, load_r2gen,
    load_studies,
)
from echo_train.data.study import Study


def _img(path: Path, fmt: str = "PNG", size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(size * size).reshape(size, size) % 251).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path, format=fmt)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    return path


def _ids(problems):
    return sorted({p.id for p in problems})


# ---------------------------------------------------------------- R2Gen
@pytest.fixture()
def r2gen(tmp_path):
    root = tmp_path / "iu_xray"
    _img(root / "images/CXR1/0.png")
    _img(root / "images/CXR1/1.png")
    _img(root / "images/CXR4/0.png")
    _corrupt(root / "images/CXR4/1.png")
    _img(root / "images/CXR5/0.png")
    _img(root / "images/CXR3/0.png")
    ann = {
        "train": [
            {"id": "CXR1", "report": "The heart is normal.  Lungs are clear.", "image_path": ["CXR1/0.png", "CXR1/1.png"], "split": "train"},
            {"id": "CXR2", "report": "No effusion.", "image_path": ["CXR2/0.png"], "split": "train"},
            {"id": "CXR3", "report": "   ", "image_path": ["CXR3/0.png"], "split": "train"},
        ],
        "val": [{"id": "CXR4", "report": "Small left effusion.", "image_path": ["CXR4/0.png", "CXR4/1.png"], "split": "val"}],
        "test": [{"id": "CXR5", "report": "No acute process.", "image_path": ["CXR5/0.png"], "split": "test"}],
    }
    (root / "annotation.json").write_text(json.dumps(ann))
    return root


def test_r2gen(r2gen):
    res = load_r2gen(r2gen / "annotation.json")
    assert res.format == "r2gen"
    assert sorted(s.id for s in res.studies) == ["CXR1", "CXR4", "CXR5"]
    assert _ids(res.problems) == ["CXR2", "CXR3", "CXR4"]
    reasons = {p.id: p.reason for p in res.problems}
    assert "file not found" in reasons["CXR2"] and "empty report" in reasons["CXR3"]
    assert "CXR4/1.png" in reasons["CXR4"] and "not found" not in reasons["CXR4"]
    by_id = {s.id: s for s in res.studies}
    assert by_id["CXR1"].findings == "The heart is normal. Lungs are clear." and by_id["CXR1"].impression == ""
    assert len(by_id["CXR1"].image_paths) == 2 and len(by_id["CXR4"].image_paths) == 1
    assert by_id["CXR4"].split == "val" and Path(by_id["CXR5"].image_paths[0]).is_file()
    assert by_id["CXR1"].report == "FINDINGS: The heart is normal. Lungs are clear."

    assert detect_format(r2gen) == detect_format(r2gen / "annotation.json") == "r2gen"
    train = load_studies(r2gen, split="train")
    assert [s.id for s in train.studies] == ["CXR1"] and _ids(train.problems) == ["CXR2", "CXR3"]
    unchecked = load_studies(r2gen, check_images=False)  # existence only: the corrupt file passes
    assert len(unchecked.studies) == 3 and _ids(unchecked.problems) == ["CXR2", "CXR3"]
    summary = res.summary()
    assert "3 studies" in summary and "3 problems" in summary and "CXR2" in summary


# ---------------------------------------------------------------- MIMIC-CXR-JPG
MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 COMPARISON:  None.

 FINDINGS:
 
 The lungs are clear.  There is no
 pleural effusion or pneumothorax.
 
 IMPRESSION:
 
 No acute cardiopulmonary process.
"""


@pytest.fixture()
def mimic(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    study = root / "files/p10/p10000001"
    _img(study / "s50000001/aaa.jpg", "JPEG")
    _img(study / "s50000001/bbb.jpg", "JPEG")
    (study / "s50000001.txt").write_text(MIMIC_REPORT)
    _img(study / "s50000002/ccc.jpg", "JPEG")  # no report file
    _img(study / "s50000003/ddd.jpg", "JPEG")
    (study / "s50000003.txt").write_text(" FINAL REPORT\n INDICATION: fever.\n")  # neither section
    other = root / "files/p11/p11000009"
    good = _img(other / "s50000004/eee.jpg", "JPEG").read_bytes()
    (other / "s50000004/eee.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (other / "s50000004.txt").write_text(" IMPRESSION: Right lower lobe pneumonia.\n")
    _img(other / "s50000005/fff.jpg", "JPEG")
    (other / "s50000005.txt").write_text(" FINDINGS: Small left effusion.\n IMPRESSION: Effusion.\n")
    rows = [("aaa", 50000001, 10000001, "train"), ("bbb", 50000001, 10000001, "train"),
            ("ccc", 50000002, 10000001, "train"), ("ddd", 50000003, 10000001, "validate"),
            ("eee", 50000004, 11000009, "test"), ("fff", 50000005, 11000009, "test")]
    with open(root / "mimic-cxr-2.0.0-split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dicom_id", "study_id", "subject_id", "split"])
        w.writerows(rows)
    return root


def test_mimic_sections():
    f, i = extract_findings_impression(MIMIC_REPORT)
    assert f == "The lungs are clear. There is no pleural effusion or pneumothorax."
    assert i == "No acute cardiopulmonary process."
    assert extract_findings_impression("INDICATION: x") == ("", "")


def test_mimic_cxr(mimic):
    assert detect_format(mimic) == "mimic-cxr"
    res = load_studies(mimic)
    assert res.format == "mimic-cxr"
    assert sorted(s.id for s in res.studies) == ["s50000001", "s50000005"]
    assert _ids(res.problems) == ["s50000002", "s50000003", "s50000004"]
    reasons = {p.id: p.reason for p in res.problems}
    assert "not found" in reasons["s50000002"] and "empty report" in reasons["s50000003"]
    assert "eee.jpg" in reasons["s50000004"]
    s1 = {s.id: s for s in res.studies}["s50000001"]
    assert len(s1.image_paths) == 2 and s1.split == "train" and s1.impression == "No acute cardiopulmonary process."
    assert s1.attributes == {"subject_id": "10000001", "study_id": "50000001"}
    test = load_mimic_cxr(mimic, split="test")
    assert [s.id for s in test.studies] == ["s50000005"] and _ids(test.problems) == ["s50000004"]
    val = load_studies(mimic / "mimic-cxr-2.0.0-split.csv", split="val")  # the split CSV itself
    assert val.studies == [] and _ids(val.problems) == ["s50000003"]


def test_mimic_without_split_csv_and_separate_reports(mimic, tmp_path):
    reports = tmp_path / "mimic-cxr-reports"
    for txt in (mimic / "files").rglob("*.txt"):
        dest = reports / "files" / txt.relative_to(mimic / "files")
        dest.parent.mkdir(parents=True, exist_ok=True)
        txt.rename(dest)
    (mimic / "mimic-cxr-2.0.0-split.csv").unlink()
    res = load_mimic_cxr(mimic, reports_root=reports)
    assert sorted(s.id for s in res.studies) == ["s50000001", "s50000005"]
    assert all(s.split == "train" for s in res.studies)
    assert _ids(res.problems) == ["s50000002", "s50000003", "s50000004"]


# ---------------------------------------------------------------- CheXpert Plus
@pytest.fixture()
def chexpert(tmp_path):
    root = tmp_path / "chexpert_plus"
    _img(root / "train/patient1/study1/view1_frontal.png")
    _img(root / "train/patient1/study1/view2_lateral.png")
    _img(root / "train/patient3/study1/view1_frontal.png")
    _img(root / "valid/patient4/study1/view1_frontal.png")  # listed as .jpg
    cols = ["path_to_image", "split", "frontal_lateral", "section_findings", "section_impression", "deid_patient_id"]
    rows = [
        ["train/patient1/study1/view2_lateral.jpg", "train", "Lateral", "Heart normal.", "No acute disease.", "p1"],
        ["train/patient1/study1/view1_frontal.jpg", "train", "Frontal", "Heart normal.", "No acute disease.", "p1"],
        ["train/patient2/study1/view1_frontal.jpg", "train", "Frontal", "Clear lungs.", "", "p2"],
        ["train/patient3/study1/view1_frontal.jpg", "train", "Frontal", "", "nan", "p3"],
        ["valid/patient4/study1/view1_frontal.jpg", "valid", "Frontal", "", "Small effusion.", "p4"],
    ]
    with open(root / "df_chexpert_plus_240401.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(rows)
    return root


def test_chexpert_plus(chexpert):
    assert detect_format(chexpert) == detect_format(chexpert / "df_chexpert_plus_240401.csv") == "chexpert-plus"
    res = load_studies(chexpert)
    assert res.format == "chexpert-plus"
    assert sorted(s.id for s in res.studies) == ["train/patient1/study1", "valid/patient4/study1"]
    assert _ids(res.problems) == ["train/patient2/study1", "train/patient3/study1"]
    by_id = {s.id: s for s in res.studies}
    p1 = by_id["train/patient1/study1"]
    assert [Path(p).name for p in p1.image_paths] == ["view1_frontal.png", "view2_lateral.png"]  # frontal first
    assert p1.findings == "Heart normal." and p1.impression == "No acute disease."
    p4 = by_id["valid/patient4/study1"]
    assert p4.split == "val" and p4.findings == "" and p4.impression == "Small effusion."
    frontal = load_chexpert_plus(chexpert, split="train", frontal_only=True)
    assert [len(s.image_paths) for s in frontal.studies] == [1]


# ---------------------------------------------------------------- ECHO evaluation JSON
@pytest.fixture()
def echo_dir(tmp_path):
    root = tmp_path / "echo"
    _img(root / "images/a.png")
    _img(root / "images/c.png")
    _corrupt(root / "images/d.png")
    labels = {"Pleural Effusion": 1, "Pneumothorax": 0, "Edema": None}
    recs = [
        {"sample_id": "a", "images": ["images/a.png"], "ground_truth": {"findings": "x y.", "impression": "z."},
         "labels": labels, "attributes": {"split": "test", "unseen_combination": True}},
        {"sample_id": "b", "images": ["images/b.png"], "ground_truth": {"findings": "x.", "impression": ""}},
        {"sample_id": "c", "images": ["images/c.png"], "ground_truth": {"findings": "", "impression": " "}},
        {"sample_id": "d", "images": ["images/d.png"], "ground_truth": {"findings": "x.", "impression": "y."}},
    ]
    (root / "test.json").write_text(json.dumps(recs))
    (root / "train.json").write_text(json.dumps([
        {"sample_id": "t", "images": ["images/a.png"], "ground_truth": {"findings": "ok.", "impression": ""}}]))
    return root


def test_echo_json(echo_dir):
    assert detect_format(echo_dir) == detect_format(echo_dir / "test.json") == "echo-json"
    res = load_echo_json(echo_dir / "test.json")
    assert [s.id for s in res.studies] == ["a"]
    assert _ids(res.problems) == ["b", "c", "d"]
    a = res.studies[0]
    assert a.split == "test" and a.labels["Pleural Effusion"] == 1 and a.labels["Edema"] is None
    assert a.attributes["unseen_combination"] is True and a.report == "FINDINGS: x y. IMPRESSION: z."
    both = load_studies(echo_dir)
    assert sorted((s.id, s.split) for s in both.studies) == [("a", "test"), ("t", "train")]
    assert [s.id for s in load_studies(echo_dir, split="train").studies] == ["t"]


def test_echo_json_reads_synth_output(tmp_path):
    from echo_train.data.synth.generate import generate_synth

    generate_synth(tmp_path, n_train=8, n_val=3, n_test=4, image_size=32, seed=0, workers=1)
    res = load_studies(tmp_path)
    assert len(res.studies) == 15 and not res.problems
    assert {s.split for s in res.studies} == {"train", "val", "test"}
    assert all(s.labels and "No Finding" in s.labels for s in res.studies)


def test_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError):
        detect_format(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_studies(tmp_path / "missing")


# ---------------------------------------------------------------- training dataset
def test_report_dataset_and_collate(tmp_path, tiny_tokenizer):
    from echo_train.data.dataset import ReportDataset, collate_reports

    paths = [_img(tmp_path / f"{i}.png", size=20 + i) for i in range(3)]
    studies = [
        Study("s0", [str(paths[0])], "The heart size is normal.", "No acute cardiopulmonary process."),
        Study("s1", [str(paths[1])], "There is a small left pleural effusion. " * 20, ""),
        Study("s2", [str(paths[2])], "", "Pneumonia."),
    ]
    tok = tiny_tokenizer
    ds = ReportDataset(studies, tok, image_size=32, n_image_tokens=16, max_response_tokens=72)
    item = ds[0]
    assert item["pixel_values"].shape == (1, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert item["prefix_ids"].tolist() == tok.prefix_ids(16) and item["id"] == "s0"
    assert item["response_ids"].tolist() == tok.encode_response(studies[0].report)
    long = ds[1]["response_ids"]
    assert len(long) == 72 and long[-1] == tok.eos_id and (long[:-1] != tok.eos_id).all()
    # pixels: the runtime's preprocessing, value for value (training and serving share it)
    from runtime.preprocess import preprocess_image

    for i in range(3):
        assert torch.equal(ds[i]["pixel_values"], torch.from_numpy(preprocess_image(paths[i], 32))), i
    # cached in memory (the module's promise): with the file gone, the same pixels come back
    paths[0].unlink()
    assert torch.equal(ds[0]["pixel_values"], item["pixel_values"])

    batch = collate_reports([ds[0], ds[1], ds[2]], pad_to_multiple=16, eos_id=tok.eos_id)
    B, L = batch["response_ids"].shape
    assert B == 3 and L == 80
    assert batch["pixel_values"].shape == (3, 1, 32, 32) and batch["prefix_ids"].shape == (3, len(tok.prefix_ids(16)))
    lengths = [len(ds[i]["response_ids"]) for i in range(3)]
    assert batch["response_mask"].sum(1).tolist() == lengths
    for k, n in enumerate(lengths):
        assert batch["response_ids"][k, n - 1] == tok.eos_id  # the first EOS is a real token
        assert (batch["response_ids"][k, n:] == tok.eos_id).all()
        assert batch["response_ids"][k, :n].tolist() == ds[k]["response_ids"].tolist()
    assert batch["ids"] == ["s0", "s1", "s2"]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: collate_reports(b, 8, tok.eos_id))
    assert [b["response_ids"].shape[1] % 8 for b in loader] == [0, 0]
