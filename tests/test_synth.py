"""The synthetic benchmark: determinism, splits, held-out combinations, grammar, and that
the image (not the prior) carries the findings."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from echo_train.data.synth import grammar
from echo_train.data.synth.findings import combination_key
from echo_train.data.synth.generate import generate_synth, plan_studies
from echo_train.data.synth.render import render_study

OBS = [o for o in grammar.OBSERVATIONS if o != "No Finding"]


@pytest.fixture(scope="module")
def plan():
    """Reports and labels of the default-size benchmark (no images: fast)."""
    return plan_studies(2000, 200, 200, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = generate_synth(out, n_train=60, n_val=20, n_test=20, image_size=48, seed=3, workers=1, preview=True)
    return out, meta


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != "preview.png"}


def test_generate_is_deterministic_by_seed(tmp_path):
    a = generate_synth(tmp_path / "a", n_train=12, n_val=4, n_test=4, image_size=32, seed=5, workers=1)
    b = generate_synth(tmp_path / "b", n_train=12, n_val=4, n_test=4, image_size=32, seed=5, workers=2)
    c = generate_synth(tmp_path / "c", n_train=12, n_val=4, n_test=4, image_size=32, seed=6, workers=1)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb and a == b
    assert fa.keys() == fc.keys() and fa["train.json"] != fc["train.json"]


def test_layout_splits_and_meta(small):
    out, meta = small
    ids = set()
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        recs = json.loads((out / f"{split}.json").read_text())
        assert len(recs) == n == meta["counts"][split]
        for r in recs:
            assert r["sample_id"].startswith(split) and r["sample_id"] not in ids
            ids.add(r["sample_id"])
            assert r["images"] == [f"images/{r['sample_id']}.png"]
            im = Image.open(out / r["images"][0])
            assert im.mode == "L" and im.size == (48, 48)
            assert set(r["ground_truth"]) == {"findings", "impression"}
            assert list(r["labels"]) == list(grammar.OBSERVATIONS)
            assert r["attributes"]["split"] == split and "unseen_combination" in r["attributes"]
    assert meta["generator_version"] and meta["seed"] == 3 and meta["seen_combinations"] > 0
    assert (out / "meta.json").is_file() and (out / "preview.png").is_file()


def test_unseen_combinations_marked(plan):
    seen = {r["attributes"]["combination"] for r in plan["train"]}
    assert 30 < len(seen)
    for split in ("val", "test"):
        flags = [r["attributes"]["unseen_combination"] for r in plan[split]]
        assert 0.15 <= np.mean(flags) <= 0.25
        for r in plan[split]:
            key = combination_key(r["attributes"]["findings"])
            assert key == r["attributes"]["combination"]
            assert r["attributes"]["unseen_combination"] == (key not in seen)
    assert not any(r["attributes"]["unseen_combination"] for r in plan["train"])
    normal = np.mean([r["attributes"]["normal"] for r in plan["train"]])
    assert 0.25 < normal < 0.42


def test_every_statement_has_three_paraphrases():
    for st in grammar.STATEMENTS:
        for attrs in st.domain():
            assert len(set(st.realise(attrs))) >= 3, (st.key, attrs)


def test_generated_sentences_are_valid_and_labels_match(plan):
    n_sent = Counter()
    for split in plan.values():
        for r in split:
            gt = r["ground_truth"]
            report = f"FINDINGS: {gt['findings']} IMPRESSION: {gt['impression']}"
            for s in grammar.split_sentences(report):
                assert grammar.is_valid_sentence(s), s
                assert grammar.sentence_findings(s)
                n_sent[grammar.normalize_sentence(s)] += 1
            assert grammar.report_labels(report) == r["labels"]
            # positives of the findings dict are what the labels say
            f = r["attributes"]["findings"]
            assert (r["labels"]["Pleural Effusion"] == 1) == ("pleural_effusion" in f)
            assert (r["labels"]["Pneumothorax"] == 1) == ("pneumothorax" in f)
            assert (r["labels"]["Cardiomegaly"] == 1) == ("cardiomegaly" in f)
            assert (r["labels"]["No Finding"] == 1) == (not set(f) - {"endotracheal_tube", "central_line", "pacemaker"})
    assert len(n_sent) > 150  # the generator uses a good part of the grammar
    vocab = grammar.vocabulary()
    assert 80 < len(vocab) < 400
    reports = [json.dumps(r["ground_truth"]) for r in plan["train"]]
    assert len(set(reports)) > 0.9 * len(reports)


def test_corrupted_sentences_are_invalid(plan):
    rng = np.random.default_rng(0)
    sentences = sorted({s for r in plan["test"] for s in grammar.split_sentences(r["ground_truth"]["findings"])})
    assert sentences
    for s in sentences:
        words = s.rstrip(".").split()
        i = int(rng.integers(len(words) - 1))
        swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
        if swapped != words:
            assert not grammar.is_valid_sentence(" ".join(swapped) + "."), swapped
        dup = words[: i + 1] + [words[i]] + words[i + 1 :]
        assert not grammar.is_valid_sentence(" ".join(dup) + "."), dup
        assert not grammar.is_valid_sentence(" ".join(words[:-1]) + ".")
    # normalisation: case, spacing and the final period do not matter
    assert grammar.is_valid_sentence("  There is  no pleural effusion ")
    assert grammar.is_valid_sentence("No pneumothorax is seen .")
    assert grammar.sentence_findings("there is no pleural effusion or pneumothorax.") == [
        ("Pleural Effusion", 0), ("Pneumothorax", 0)]
    assert grammar.sentence_findings("there is no no pneumothorax.") == []
    assert grammar.split_sentences("FINDINGS: a b. c d. IMPRESSION: e.") == ["a b.", "c d.", "e."]


def test_report_token_lengths(plan):
    from echo_train.data.study import format_report
    from echo_train.data.tokenizer import train_tokenizer

    train = [format_report(r["ground_truth"]["findings"], r["ground_truth"]["impression"]) for r in plan["train"]]
    tok = train_tokenizer(train, vocab_size=1024)
    lengths = np.array([len(tok.encode(format_report(r["ground_truth"]["findings"], r["ground_truth"]["impression"])))
                        for r in plan["test"]])
    assert 30 <= lengths.min() and lengths.max() <= 200, (lengths.min(), lengths.max())
    assert 40 <= np.median(lengths) <= 120, np.median(lengths)


def _micro_f1(pred: list[dict], gold: list[dict]) -> float:
    tp = fp = fn = 0
    for p, g in zip(pred, gold):
        for o in OBS:
            pp, gg = p.get(o) == 1, g.get(o) == 1
            tp += pp and gg
            fp += pp and not gg
            fn += gg and not pp
    return 2 * tp / max(1, 2 * tp + fp + fn)


def test_image_blind_answers_score_far_below_ground_truth(plan):
    train = [r["labels"] for r in plan["train"]]
    test = [r["labels"] for r in plan["test"]]
    assert _micro_f1(test, test) == 1.0
    # 1) the most frequent training report's labels, for every study
    common = Counter(json.dumps(r["labels"], sort_keys=True) for r in plan["train"]).most_common(1)[0][0]
    f_common = _micro_f1([json.loads(common)] * len(test), test)
    # 2) per-observation majority label
    majority = {o: Counter(l[o] == 1 for l in train).most_common(1)[0][0] for o in OBS}
    f_major = _micro_f1([{o: 1 if majority[o] else 0 for o in OBS}] * len(test), test)
    # 3) the best prior threshold: positive for every observation more frequent than t
    prev = {o: np.mean([l[o] == 1 for l in train]) for o in OBS}
    f_prior = max(_micro_f1([{o: int(prev[o] >= t) for o in OBS}] * len(test), test) for t in set(prev.values()))
    assert max(f_common, f_major, f_prior) < 0.5, (f_common, f_major, f_prior)


FINDING_EXAMPLES = {
    "cardiomegaly": {"severity": "mild"},
    "pleural_effusion": {"side": "right", "size": "small"},
    "pneumothorax": {"side": "left"},
    "consolidation": {"lobe": "right upper lobe"},
    "lung_lesion": {"kind": "nodule", "zone": "left upper"},
    "atelectasis": {"side": "left"},
    "edema": {"severity": "mild"},
    "rib_fracture": {"side": "right"},
    "endotracheal_tube": {},
    "central_line": {"side": "right"},
    "pacemaker": {},
}


@pytest.mark.parametrize("name", sorted(FINDING_EXAMPLES))
def test_every_finding_is_visible_at_64px(name):
    """Same seed, same anatomy and exposure: the finding alone must change a visible area
    of the 64-px downsample by more than 25 grey levels."""
    def at64(a):
        return np.asarray(Image.fromarray(a).resize((64, 64), Image.BILINEAR), dtype=np.float32)

    changed = []
    for seed in range(6):
        base, _ = render_study({}, 128, seed)
        img, _ = render_study({name: FINDING_EXAMPLES[name]}, 128, seed)
        changed.append(float((np.abs(at64(img) - at64(base)) > 25).mean()))
    assert min(changed) > 0.001, changed  # smallest finding (a nodule, a fracture): ~ 15 pixels of 4096
    assert np.mean(changed) > 0.004, changed
