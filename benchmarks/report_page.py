"""The README's picture of the report page: echo-serve --ui on a real engine, one image uploaded
in headless Chromium, the page photographed once the report has streamed in.

    make demo      # engines/echo and data/synth
    .venv/bin/python -m benchmarks.report_page --engine-dir engines/echo \\
        --image data/synth/images/test-00000.png --out benchmarks/results/serve/report_page_demo.png

The server runs in the serve environment (.venv/serve, `--serve-python`), the browser is Debian's
`chromium` driven by Playwright from this interpreter (the `serve-test` extra). It checks what it
photographs: the page's report is `echo-report`'s text for the same image, streamed block by block.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .serve_load import ROOT, EchoServe, free_port

VIEWPORT = {"width": 1000, "height": 490}


def reference_text(engine_dir: Path, image: Path, serve_python: Path) -> str:
    """`echo-report`'s text for the image, from the same environment the server runs in."""
    cmd = [str(serve_python), "-c", "from runtime.cli import main; main()", "--engine-dir", str(engine_dir),
           "--format", "json", str(image)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])["text"]


def photograph(engine_dir: Path, image: Path, out: Path, serve_python: Path) -> dict:
    """Serve the engine, upload `image` on the report page, save the page to `out`; what the page showed."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("report_page: Debian's chromium is not installed (apt-get install chromium)")
    expected = reference_text(engine_dir, image, serve_python)
    ui_port = free_port()
    server = EchoServe(str(engine_dir), 1, ("--ui", "--ui-port", str(ui_port)), python=str(serve_python))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(f"http://127.0.0.1:{ui_port}/")
                page.set_input_files("#file", str(image))
                page.wait_for_selector('#status[data-state="done"], #status[data-state="error"]', timeout=120_000)
                state = page.evaluate("window.echo")
                shown = page.inner_text("#report")
                if state["error"] is not None or shown != expected:
                    raise SystemExit(f"report_page: the page shows {shown!r} (error {state['error']!r}), "
                                     f"echo-report wrote {expected!r}")
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
                return {"text": shown, "blocks": state["blocks"], "meta": page.inner_text("#meta")}
            finally:
                browser.close()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", type=Path, default=ROOT / "engines" / "echo")
    ap.add_argument("--image", type=Path, default=ROOT / "data" / "synth" / "images" / "test-00000.png")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve" / "report_page_demo.png")
    ap.add_argument("--serve-python", type=Path, default=ROOT / ".venv" / "serve" / "bin" / "python")
    a = ap.parse_args(argv)
    shown = photograph(a.engine_dir.resolve(), a.image.resolve(), a.out, a.serve_python)
    print(json.dumps({"out": str(a.out), "bytes": a.out.stat().st_size, **shown}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
