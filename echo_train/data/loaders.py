"""Dataset loaders: every supported format -> `LoadResult(studies, problems)`.

Formats (one function each; `load_studies` detects which one a path is):

- `load_echo_json`   the ECHO evaluation JSON that `echo-train synth` writes:
                     [{"sample_id", "images": [...], "ground_truth": {"findings", "impression"},
                       "labels"?, "attributes"?}], image paths relative to the JSON file.
                     A folder with train.json / val.json / test.json loads all three.
- `load_r2gen`       R2Gen's annotation.json (IU X-ray, MIMIC-CXR as R2Gen ships them):
                     {"train": [{"id", "report", "image_path": [...], "split"}], "val": [...],
                     "test": [...]}; image paths relative to an images root (default: the
                     folder `images/` beside annotation.json, else that folder itself). The
                     report is one string: it becomes the findings, impression "".
- `load_mimic_cxr`   MIMIC-CXR-JPG: files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg, the report
                     sNNNNNNNN.txt from mimic-cxr-reports (looked up under reports_root/files/
                     pXX/pNNNNNNNN/, then beside the study folder), and
                     mimic-cxr-2.0.0-split.csv[.gz] (dicom_id, study_id, subject_id, split).
                     FINDINGS and IMPRESSION sections are cut out of the free text; a report
                     with neither is a problem. Without the split CSV every study folder under
                     files/ is loaded with split "train".
- `load_chexpert_plus` CheXpert Plus df_chexpert_plus_240401.csv: one row per image. Rows
                     are grouped into studies by the folder of `path_to_image`
                     (patientN/studyM); findings = `section_findings`, impression =
                     `section_impression` (first non-empty value in the study; empty, NaN or the
                     strings nan/None/null/n/a -> ""); a study whose two sections are both empty is a problem. `split`
                     "valid" -> "val" (CheXpert Plus has no test split). Images are looked up
                     under images_root (default: the CSV's folder); if the listed file is
                     missing, the same name with .png / .jpg is tried (the dataset ships both).
                     `frontal_only=True` keeps rows whose `frontal_lateral` is "Frontal".

Bad records never stop a load and are never dropped silently: a missing or unreadable
image (checked with `runtime.preprocess.read_image` when `check_images=True`) or an empty
report becomes a `Problem(id, reason)`. A study keeps its readable images; it is skipped
when none is left or its report is empty. Split names are normalised to train/val/test.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from runtime.errors import ImageReadError
from runtime.preprocess import read_image

from .study import Study

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validate": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


@dataclass(frozen=True)
class Problem:
    id: str
    reason: str


@dataclass
class LoadResult:
    studies: list[Study]
    problems: list[Problem] = field(default_factory=list)
    format: str = ""
    source: str = ""

    def summary(self, max_problems: int = 10) -> str:
        counts: dict[str, int] = {}
        for s in self.studies:
            counts[s.split] = counts.get(s.split, 0) + 1
        n_img = sum(len(s.image_paths) for s in self.studies)
        split_txt = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
        lines = [f"{self.format or 'dataset'} {self.source}: {len(self.studies)} studies ({split_txt}), "
                 f"{n_img} images, {len(self.problems)} problems"]
        for p in self.problems[:max_problems]:
            lines.append(f"  {p.id}: {p.reason}")
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)

    def extend(self, other: "LoadResult") -> "LoadResult":
        self.studies += other.studies
        self.problems += other.problems
        return self


def normalize_split(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(f"unknown split {name!r}; expected one of train, val, test")
    return SPLIT_ALIASES[key]


_MISSING = {"nan", "none", "null", "n/a"}


def _text(v, missing_words: bool = False) -> str:
    """A report field as text: None / NaN -> ''; with missing_words, also the strings
    'nan', 'None', 'null', 'n/a' that CSV exports write for missing values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    t = " ".join(str(v).split())
    return "" if missing_words and t.lower() in _MISSING else t


class _Builder:
    """Collects candidate studies, checks images (in threads) and reports, records problems."""

    def __init__(self, check_images: bool) -> None:
        self.check_images = check_images
        self.candidates: list[tuple[Study, list[Path]]] = []
        self.problems: list[Problem] = []

    def problem(self, sid: str, reason: str) -> None:
        self.problems.append(Problem(str(sid), reason))

    def add(self, study: Study, images: Iterable[Path]) -> None:
        self.candidates.append((study, list(images)))

    def _check(self, path: Path) -> Optional[str]:
        if not self.check_images:
            return None if path.is_file() else f"{path}: file not found"
        try:
            read_image(path)
        except ImageReadError as e:
            return str(e)
        return None

    def result(self, fmt: str, source) -> LoadResult:
        all_paths = sorted({p for _, imgs in self.candidates for p in imgs})
        with ThreadPoolExecutor(max_workers=8) as pool:
            errors = dict(zip(all_paths, pool.map(self._check, all_paths)))
        studies = []
        for st, imgs in self.candidates:
            if not st.findings.strip() and not st.impression.strip():
                self.problem(st.id, "empty report")
                continue
            if not imgs:
                self.problem(st.id, "study lists no images")
                continue
            good = []
            for p in imgs:
                err = errors[p]
                if err is None:
                    good.append(str(p))
                else:
                    self.problem(st.id, err)
            if not good:
                continue
            st.image_paths = good
            studies.append(st)
        return LoadResult(studies, self.problems, fmt, str(source))


# ---------------------------------------------------------------- ECHO evaluation JSON
def load_echo_json(path: str | Path, split: Optional[str] = None, check_images: bool = True) -> LoadResult:
    """ECHO evaluation JSON file, or a folder holding train.json / val.json / test.json."""
    p = Path(path)
    want = normalize_split(split)
    if p.is_dir():
        res = LoadResult([], [], "echo-json", str(p))
        files = [p / f"{s}.json" for s in ("train", "val", "test") if want in (None, s)]
        found = [f for f in files if f.is_file()]
        if not found:
            raise FileNotFoundError(f"{p}: no {', '.join(f.name for f in files)}")
        for f in found:
            res.extend(load_echo_json(f, split, check_images))
        return res
    records = json.loads(p.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{p}: ECHO evaluation JSON must be a list of records")
    stem_split = SPLIT_ALIASES.get(p.stem.lower())
    b = _Builder(check_images)
    for k, r in enumerate(records):
        sid = str(r.get("sample_id", r.get("id", f"{p.stem}:{k}")))
        attrs = dict(r.get("attributes") or {})
        try:
            rsplit = normalize_split(attrs.get("split") or r.get("split") or stem_split or "test")
        except ValueError as e:
            b.problem(sid, str(e))
            continue
        if want is not None and rsplit != want:
            continue
        gt = r.get("ground_truth") or {}
        if isinstance(gt, str):
            gt = {"findings": gt, "impression": ""}
        labels = r.get("labels")
        st = Study(sid, [], _text(gt.get("findings")), _text(gt.get("impression")), rsplit,
                   dict(labels) if isinstance(labels, dict) else None, attrs)
        b.add(st, [p.parent / im for im in (r.get("images") or [])])
    return b.result("echo-json", p)


# ---------------------------------------------------------------- R2Gen annotation.json
def load_r2gen(path: str | Path, images_root: Optional[str | Path] = None, split: Optional[str] = None,
               check_images: bool = True) -> LoadResult:
    p = Path(path)
    if p.is_dir():
        p = p / "annotation.json"
    ann = json.loads(p.read_text())
    if images_root is None:
        images_root = p.parent / "images" if (p.parent / "images").is_dir() else p.parent
    root = Path(images_root)
    want = normalize_split(split)
    b = _Builder(check_images)
    for key, items in ann.items():
        try:
            ksplit = normalize_split(key)
        except ValueError:
            continue  # not a split list
        if want is not None and ksplit != want:
            continue
        for k, r in enumerate(items):
            sid = str(r.get("id", f"{key}:{k}"))
            paths = r.get("image_path") or []
            if isinstance(paths, str):
                paths = [paths]
            st = Study(sid, [], _text(r.get("report")), "", ksplit, None,
                       {k2: r[k2] for k2 in ("study_id", "subject_id") if k2 in r})
            b.add(st, [root / ip for ip in paths])
    return b.result("r2gen", p)


# ---------------------------------------------------------------- MIMIC-CXR-JPG
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """Free-text radiology report -> {HEADING: text} for every 'HEADING:' at a line start."""
    out: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    for m, nxt in zip(matches, matches[1:] + [None]):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        name = m.group(1).strip()
        out[name] = (out.get(name, "") + " " + " ".join(body.split())).strip()
    return out


def extract_findings_impression(text: str) -> tuple[str, str]:
    s = report_sections(text)
    findings = s.get("FINDINGS", "") or s.get("FINDINGS AND IMPRESSION", "")
    impression = s.get("IMPRESSION", "") or s.get("CONCLUSION", "")
    return findings, impression


def _read_csv(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))))


def _find(root: Path, names: Iterable[str]) -> Optional[Path]:
    for n in names:
        if (root / n).is_file():
            return root / n
    return None


def load_mimic_cxr(root: str | Path, reports_root: Optional[str | Path] = None, split_csv: Optional[str | Path] = None,
                   split: Optional[str] = None, check_images: bool = True) -> LoadResult:
    root = Path(root)
    files = root / "files" if (root / "files").is_dir() else root
    rroot = Path(reports_root) if reports_root is not None else root
    rfiles = rroot / "files" if (rroot / "files").is_dir() else rroot
    if split_csv is None:
        split_csv = _find(root, ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz"))
    want = normalize_split(split)
    b = _Builder(check_images)
    for st_id, d in sorted(_mimic_studies(files, split_csv).items()):
        sid = f"s{st_id}"
        try:
            ssplit = normalize_split(d["split"])
        except ValueError as e:
            b.problem(sid, str(e))
            continue
        if want is not None and ssplit != want:
            continue
        subj = d["subject"]
        rel = Path(f"p{subj[:2]}") / f"p{subj}"
        sdir = files / rel / sid
        rpath = _find(rfiles / rel, [f"{sid}.txt"]) or _find(files / rel, [f"{sid}.txt"])
        if rpath is None:
            b.problem(sid, f"report {rel / (sid + '.txt')} not found")
            continue
        try:
            findings, impression = extract_findings_impression(rpath.read_text(errors="replace"))
        except OSError as e:
            b.problem(sid, f"{rpath}: cannot read report ({e})")
            continue
        st = Study(sid, [], findings, impression, ssplit, None, {"subject_id": subj, "study_id": st_id})
        b.add(st, [sdir / f"{dcm}.jpg" for dcm in d["dicoms"]])
    return b.result("mimic-cxr", root)


def _mimic_studies(files: Path, split_csv: Optional[str | Path]) -> dict[str, dict]:
    """study id -> its subject, split and DICOM ids: from the split CSV, else from the folders
    (every study in train)."""
    studies: dict[str, dict] = {}
    if split_csv is not None:
        for row in _read_csv(Path(split_csv)):
            st = str(row["study_id"]).strip()
            d = studies.setdefault(st, {"subject": str(row["subject_id"]).strip(), "split": row.get("split", "train"),
                                        "dicoms": []})
            d["dicoms"].append(str(row["dicom_id"]).strip())
    else:
        for sdir in sorted(files.glob("p*/p*/s*")):
            if sdir.is_dir():
                studies[sdir.name[1:]] = {"subject": sdir.parent.name[1:], "split": "train",
                                          "dicoms": sorted(q.stem for q in sdir.glob("*.jpg"))}
    return studies


# ---------------------------------------------------------------- CheXpert Plus
def load_chexpert_plus(csv_path: str | Path, images_root: Optional[str | Path] = None, split: Optional[str] = None,
                       check_images: bool = True, frontal_only: bool = False) -> LoadResult:
    p = Path(csv_path)
    if p.is_dir():
        found = sorted(p.glob("df_chexpert_plus*.csv"))
        if not found:
            raise FileNotFoundError(f"{p}: no df_chexpert_plus*.csv")
        p = found[-1]
    root = Path(images_root) if images_root is not None else p.parent
    want = normalize_split(split)
    b = _Builder(check_images)
    for sid, g in _chexpert_studies(p, b, frontal_only).items():
        try:
            ssplit = normalize_split(g["split"])
        except ValueError as e:
            b.problem(sid, str(e))
            continue
        if want is not None and ssplit != want:
            continue
        paths = [_chexpert_image(root, ip) for _, ip in sorted(g["images"])]
        b.add(Study(sid, [], g["findings"], g["impression"], ssplit), paths)
    return b.result("chexpert-plus", p)


def _chexpert_studies(p: Path, b: _Builder, frontal_only: bool) -> dict[str, dict]:
    """study folder -> its split, images (frontal views first) and the first findings and
    impression its rows give; a row without an image path is a problem of `b`."""
    groups: dict[str, dict] = {}
    for k, row in enumerate(_read_csv(p)):
        ip = (row.get("path_to_image") or "").strip()
        if not ip:
            b.problem(f"row {k + 2}", "no path_to_image")
            continue
        sid = str(Path(ip).parent)
        g = groups.setdefault(sid, {"split": row.get("split") or "train", "images": [], "findings": "", "impression": ""})
        if frontal_only and (row.get("frontal_lateral") or "Frontal").strip().lower() != "frontal":
            continue
        frontal = (row.get("frontal_lateral") or "Frontal").strip().lower() == "frontal"
        g["images"].append((not frontal, ip))  # frontal views sort first
        g["findings"] = g["findings"] or _text(row.get("section_findings"), True)
        g["impression"] = g["impression"] or _text(row.get("section_impression"), True)
    return groups


def _chexpert_image(root: Path, ip: str) -> Path:
    """The image file of a CSV path, also where it was converted to PNG or JPEG."""
    q = root / ip
    if not q.is_file():
        for ext in (".png", ".jpg"):
            if q.with_suffix(ext).is_file():
                return q.with_suffix(ext)
    return q


# ---------------------------------------------------------------- detection
def detect_format(path: str | Path) -> str:
    """'echo-json' | 'r2gen' | 'mimic-cxr' | 'chexpert-plus'; ValueError if unknown."""
    p = Path(path)
    if p.is_dir():
        if any((p / f"{s}.json").is_file() for s in ("train", "val", "test")):
            return "echo-json"
        if (p / "annotation.json").is_file():
            return "r2gen"
        if list(p.glob("df_chexpert_plus*.csv")):
            return "chexpert-plus"
        if _find(p, ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")) or list(p.glob("files/p*/p*")):
            return "mimic-cxr"
    elif p.is_file():
        name = p.name.lower()
        if name.endswith(".json"):
            data = json.loads(p.read_text())
            if isinstance(data, list):
                return "echo-json"
            if isinstance(data, dict) and any(k.lower() in SPLIT_ALIASES for k in data):
                return "r2gen"
        elif name.endswith((".csv", ".csv.gz")):
            rows = _read_csv(p)[:1]
            header = set(rows[0]) if rows else set()
            if "path_to_image" in header:
                return "chexpert-plus"
            if {"dicom_id", "study_id"} <= header:
                return "mimic-cxr"
    else:
        raise FileNotFoundError(f"{p}: no such file or folder")
    raise ValueError(f"{p}: not a known dataset format (ECHO JSON, R2Gen annotation.json, MIMIC-CXR-JPG, CheXpert Plus)")


def load_studies(path: str | Path, split: Optional[str] = None, check_images: bool = True, **kwargs) -> LoadResult:
    """Load any supported dataset; extra keyword arguments go to the format's loader."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "echo-json":
        return load_echo_json(p, split, check_images)
    if fmt == "r2gen":
        return load_r2gen(p, split=split, check_images=check_images, **kwargs)
    if fmt == "chexpert-plus":
        return load_chexpert_plus(p, split=split, check_images=check_images, **kwargs)
    if p.is_file():  # the split CSV itself
        kwargs.setdefault("split_csv", p)
        p = p.parent
    return load_mimic_cxr(p, split=split, check_images=check_images, **kwargs)
