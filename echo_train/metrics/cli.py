"""echo-eval: score generated reports against references.

    echo-eval --pred preds.jsonl --ref refs.jsonl --out metrics.json \\
        [--metrics finding_f1,bleu,...] [--semscore-model DIR] \\
        [--ratescore-ner DIR --ratescore-biolord DIR] [--markdown FILE]

Each JSONL line is {"id": ..., "report": ...}, or {"id": ..., "findings": ..., "impression": ...}
(joined as "FINDINGS: ... IMPRESSION: ..."). Lines are matched by id.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .report import ALL_METRICS, DEFAULT_METRICS, EvalConfig, evaluate_reports


def _join(findings: str, impression: str) -> str:
    parts = []
    if findings and findings.strip():
        parts.append("FINDINGS: " + " ".join(findings.split()))
    if impression and impression.strip():
        parts.append("IMPRESSION: " + " ".join(impression.split()))
    return " ".join(parts)


def read_reports(path: str | Path) -> dict[str, str]:
    """id -> report text from a JSONL file; raises click.ClickException with file:line on errors."""
    path = Path(path)
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise click.ClickException(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise click.ClickException(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if "id" not in rec:
                raise click.ClickException(f"{where}: no \"id\" field")
            rid = str(rec["id"])
            if "report" in rec:
                text = rec["report"]
            elif "findings" in rec or "impression" in rec:
                f_, i_ = rec.get("findings") or "", rec.get("impression") or ""
                if not isinstance(f_, str) or not isinstance(i_, str):
                    raise click.ClickException(f"{where}: findings/impression must be strings")
                text = _join(f_, i_)
            else:
                raise click.ClickException(f"{where}: needs \"report\", or \"findings\" and/or \"impression\"")
            if not isinstance(text, str):
                raise click.ClickException(f"{where}: \"report\" must be a string, got {type(text).__name__}")
            if rid in out:
                raise click.ClickException(f"{where}: duplicate id {rid!r}")
            out[rid] = text
    if not out:
        raise click.ClickException(f"{path}: no reports")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pred", "pred_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Generated reports (JSONL).")
@click.option("--ref", "ref_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Reference reports (JSONL).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="metrics.json to write.")
@click.option("--metrics", default=",".join(DEFAULT_METRICS), show_default=True,
              help=f"Comma-separated, from: {', '.join(ALL_METRICS)}; or 'all'.")
@click.option("--semscore-model", type=click.Path(file_okay=False), default=None,
              help="all-mpnet-base-v2 folder (default: ECHO_SEMSCORE_MODEL, then the PyPI part packages).")
@click.option("--embedding-model", type=click.Path(file_okay=False), default=None,
              help="Any encoder folder for embedding_cosine (mean pooling).")
@click.option("--embedding-label", default=None, help="Name of that model in the results, e.g. MiniLM.")
@click.option("--cls-model", type=click.Path(file_okay=False), default=None,
              help="Encoder folder for the SembScore-style CLS cosine.")
@click.option("--ratescore-ner", type=click.Path(file_okay=False), default=None, help="RaTE-NER-Deberta folder.")
@click.option("--ratescore-biolord", type=click.Path(file_okay=False), default=None, help="BioLORD-2023-C folder.")
@click.option("--chexbert-weights", type=click.Path(dir_okay=False), default=None, help="chexbert.pth.")
@click.option("--n-boot", type=int, default=1000, show_default=True, help="Bootstrap resamples (0: no CIs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--uncertain-as-positive", is_flag=True, help="Finding F1 counts uncertain (-1) as positive.")
@click.option("--device", default=None, help="torch device for model-based metrics (default: cuda if available).")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None, help="Also write a markdown table.")
@click.option("--no-per-study", is_flag=True, help="Leave per-study scores out of the JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars, no table on stdout.")
def main(pred_path, ref_path, out_path, metrics, semscore_model, embedding_model, embedding_label, cls_model,
         ratescore_ner, ratescore_biolord, chexbert_weights, n_boot, seed, uncertain_as_positive, device,
         md_path, no_per_study, quiet):
    """Score generated chest X-ray reports against references (clinical and language metrics)."""
    names = list(ALL_METRICS) if metrics.strip() == "all" else [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise click.BadParameter(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}",
                                 param_hint="--metrics")
    preds = read_reports(pred_path)
    refs = read_reports(ref_path)
    cfg = EvalConfig(n_boot=n_boot, seed=seed, uncertain_as_positive=uncertain_as_positive,
                     semscore_model=semscore_model, embedding_model=embedding_model, embedding_label=embedding_label,
                     cls_model=cls_model, ratescore_ner=ratescore_ner, ratescore_biolord=ratescore_biolord,
                     chexbert_weights=chexbert_weights, device=device, progress=not quiet)
    try:
        result = evaluate_reports(preds, refs, names, cfg)
    except KeyError as e:
        raise click.ClickException(f"ids do not match between {pred_path} and {ref_path}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.to_json(per_study=not no_per_study))
    md = result.to_markdown()
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(md)
    if not quiet:
        click.echo(md)
    click.echo(f"wrote {out}" + (f" and {md_path}" if md_path else ""))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
