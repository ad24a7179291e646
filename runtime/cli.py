"""`echo-report`: chest X-ray reports from an engine folder, without PyTorch.

    echo-report --engine-dir engines/echo a.png b.dcm [--format text|json|dicom-sr|fhir] [--stream] [--verbose]

Text output: a "==> path <==" header, then the report. JSON output: one object per line
(JSON Lines): {"path", "text", "tokens", "forward_passes", "stop", "error"[, "timings"]};
with --stream, block events {"path", "block", "tokens", "text"} come first.
fhir: one FHIR R4 DiagnosticReport per line (NDJSON). dicom-sr: one DICOM Basic Text SR file
per image, written to --out-dir as <image name>.sr.dcm (its path printed); a DICOM input's SR
joins that image's study and references its UIDs (runtime/report_formats.py).
Errors go to stderr. Exit status: 0 all reports written, 1 some input failed (the others
are still printed), 2 the engine folder or the options are unusable.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click

from .cpu_features import VNNI, int8_cpu_mismatch
from .errors import EchoRuntimeError
from .precisions import NAMES as PRECISION_NAMES
from .report_formats import FORMATS, NEEDS_DICOM, EngineInfo, ReportFormatError, SourceStudy, render, report_dict
from .schedule import OFFICIAL_RULES, UNMASK_RULES, UNMASK_THRESHOLD


def _err(msg: str) -> None:
    click.echo(f"echo-report: {msg}", err=True)


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _timing_line(r) -> str:
    t = r.timings
    blocks = t.get("blocks") or []
    decode = t.get("decode", 0.0)
    session = t.get("session", 0.0)
    over = f", outside session.run {(decode - session) / decode:.1%}" if decode > 0 else ""
    per = f" (mean {_ms(sum(blocks) / len(blocks))})" if blocks else ""
    return (f"{r.path}: preprocess {_ms(t.get('preprocess', 0.0))}, prefill {_ms(t.get('prefill', 0.0))}, "
            f"{len(blocks)} decode passes {_ms(sum(blocks))}{per}, session.run {_ms(session)}{over}, "
            f"total {_ms(t.get('total', 0.0))}, {r.forward_passes} forward passes, {len(r.tokens)} tokens, stop: {r.stop}"
            + (f", prompt {r.prompt_tokens} tokens ({r.image_tokens} of the image)" if r.prompt_tokens else ""))


def _report_json(r, verbose: bool) -> str:
    return json.dumps(report_dict(r, timings=verbose))


class _Documents:
    """--format dicom-sr / fhir: the clinical document of each report."""

    def __init__(self, fmt: str, out_dir: str, engine: EngineInfo) -> None:
        self.fmt, self.out_dir, self.engine, self.used = fmt, Path(out_dir), engine, set()
        if fmt == "dicom-sr" and importlib.util.find_spec("pydicom") is None:
            raise ReportFormatError(NEEDS_DICOM)  # before any report is decoded

    def emit(self, r) -> None:
        doc = render(self.fmt, r, SourceStudy.from_path(r.path), self.engine)
        if self.fmt == "fhir":
            click.echo(doc.decode("utf-8"))
            return
        stem, n = Path(r.path).name, 0
        while (name := f"{stem}{f'-{n}' if n else ''}.sr.dcm") in self.used:  # a.png in two folders
            n += 1
        self.used.add(name)
        out = self.out_dir / name
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            out.write_bytes(doc)
        except OSError as e:
            raise ReportFormatError(f"{out}: cannot write ({e.strerror or e})") from None
        click.echo(str(out))


class _Streamer:
    """Prints a report as it is decoded: the new text of each block, flushed."""

    def __init__(self, fmt: str) -> None:
        self.fmt, self.printed, self.started = fmt, "", False

    def __call__(self, ev) -> None:
        if self.fmt == "json":
            click.echo(json.dumps({"path": ev.path, "block": ev.block, "tokens": ev.tokens, "text": ev.text}))
            sys.stdout.flush()
            return
        if not self.started:
            click.echo(f"==> {ev.path} <==")
            self.started = True
        self._write(ev.text.rstrip("\ufffd"))  # hold back a half-decoded UTF-8 character

    def _write(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            click.echo(text[len(self.printed):], nl=False)
            sys.stdout.flush()
            self.printed = text

    def finish(self, r, verbose: bool) -> None:
        if self.fmt == "json":
            click.echo(_report_json(r, verbose))
        else:
            if not self.started:
                click.echo(f"==> {r.path} <==")
            self._write(r.text)
            click.echo("")
        sys.stdout.flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine-dir", required=True, type=click.Path(), help="engine folder built by `echo-export build`")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="text", show_default=True,
              help="text, JSON Lines, DICOM Basic Text SR files (to --out-dir) or FHIR R4 DiagnosticReport NDJSON")
@click.option("--out-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="where --format dicom-sr writes <image name>.sr.dcm")
@click.option("--stream", is_flag=True, help="print each report block by block as it is decoded")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISION_NAMES)), default="fp32", show_default=True)
@click.option("--mode", type=click.Choice(["fused", "ar", "multistep"]), default="fused", show_default=True,
              help="fused one-step block decoding (ECHO), the AR baseline graphs, or the multi-step teacher "
                   "(an ECHO_Base / stage-rad engine: --steps, --rule, --threshold)")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="multistep: denoising passes per block, 1..B [default: B, the official default]")
@click.option("--rule", type=click.Choice(list(dict.fromkeys(UNMASK_RULES + tuple(OFFICIAL_RULES)))), default=None,
              help="multistep: which masked positions each step accepts [default: low_confidence_dynamic for "
                   "imported checkpoints, dynamic-ltr for ours]")
@click.option("--threshold", type=click.FloatRange(0, 1), default=UNMASK_THRESHOLD, show_default=True,
              help="multistep: the dynamic rules accept every masked position above this confidence")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="images per forward pass, a size the engine was built for (default: its smallest)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="default: the model's max_response_tokens")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads")
@click.option("--no-share-weights", "no_share", is_flag=True,
              help="each onnxruntime graph holds its own copy of the weights (default: the graphs of one "
                   "precision share one copy; fp32 on a CPU)")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="native-resolution engines: scale each image to at most this many pixels [default: the "
                   "build's, the official 2,250,000]; fewer image tokens, less prefill time and memory")
@click.option("--verbose", "-v", is_flag=True, help="print timings (stderr)")
def main(engine_dir, images, fmt, out_dir, stream, backend, precision, mode, steps, rule, threshold, batch_size,
         max_new_tokens, threads, no_share, max_pixels, verbose) -> None:
    """Write a report for each IMAGE (PNG, JPEG or DICOM)."""
    if stream and fmt not in ("text", "json"):
        _err(f"error: --stream prints text or json, not {fmt}")
        sys.exit(2)
    rt = _open_runtime(engine_dir, backend=backend, precision=precision, batch_size=batch_size, threads=threads,
                       mode=mode, share_weights=not no_share, max_pixels=max_pixels)
    if backend == "ort":
        # int8 engines from before the int8 modes carry no "int8" entry: they are u8s8, made for VNNI;
        # other integer precisions (int8dyn) record the CPU kind in their precision_info, if they depend on it
        made_for = (rt.manifest.int8.get("chosen_for", VNNI) if precision == "int8"
                    else rt.manifest.precision_info.get(precision, {}).get("chosen_for"))
        mismatch = int8_cpu_mismatch(made_for)
        if mismatch:
            _err(f"warning: {mismatch}")
    if verbose and not rt.manifest.verified:
        _err(f"note: {engine_dir} was not verified against the PyTorch reference (manifest verified=false)")
    try:
        failed = _write_reports(rt, engine_dir, images, fmt, out_dir, stream, precision, mode, steps, rule, threshold,
                                max_new_tokens, verbose)
    except EchoRuntimeError as e:
        _err(f"error: {e}")
        sys.exit(2)
    except Exception as e:  # a bug: say so in one line unless asked for the traceback
        if verbose:
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e}" + ("" if verbose else " (--verbose shows the traceback)"))
        sys.exit(3)
    sys.exit(1 if failed else 0)


def _open_runtime(engine_dir: str, **options: Any):
    """The EchoRuntime of the folder (exit 2, one line, when it is refused)."""
    try:
        from .engine import EchoRuntime

        return EchoRuntime(engine_dir, **options)
    except EchoRuntimeError as e:
        _err(f"error: {e}")
        sys.exit(2)


def _write_reports(rt, engine_dir: str, images, fmt: str, out_dir, stream: bool, precision: str, mode: str,
                   steps, rule, threshold, max_new_tokens, verbose: bool) -> int:
    """Every image's report in `fmt` (streamed block by block, or as documents in out_dir);
    returns how many images failed."""
    from .multistep import MultistepOptions

    failed = 0
    teacher = MultistepOptions(steps, rule, threshold) if mode == "multistep" else None
    docs = None
    if fmt in ("dicom-sr", "fhir"):
        docs = _Documents(fmt, out_dir, EngineInfo.of_engine_dir(engine_dir, precision))
    if stream:
        for img in images:
            s = _Streamer(fmt)
            r = rt.generate([img], max_new_tokens=max_new_tokens, on_block=s, multistep=teacher)[0]
            failed += _emit(r, fmt, verbose, s)
    else:
        for r in rt.generate(list(images), max_new_tokens=max_new_tokens, multistep=teacher):
            failed += _emit(r, fmt, verbose, None, docs)
    return failed


def _emit(r, fmt: str, verbose: bool, streamer: Optional[_Streamer], docs: Optional[_Documents] = None) -> int:
    if r.error is not None:
        _err(r.error)
        if fmt == "json":
            click.echo(_report_json(r, verbose))
        return 1
    if streamer is not None:
        streamer.finish(r, verbose)
    elif docs is not None:
        docs.emit(r)
    elif fmt == "json":
        click.echo(_report_json(r, verbose))
    else:
        click.echo(f"==> {r.path} <==\n{r.text}")
    if verbose:
        _err(_timing_line(r))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    main()
