"""results.json -> results.md: quality and speed side by side, ideal vs achieved, overhead, setup."""
from __future__ import annotations

from typing import Any

NA = "not available: "  # the status of a cell that could not run, written by the harness

METHOD_NAMES = {"ar": "AR", "teacher": "teacher (B steps)", "naive": "naive one-step", "dcd": "DCD one-step"}


def method_name(method: str) -> str:
    """The table's name of a method; the sweep's "teacher@4" reads "teacher (4 steps)"."""
    base, _, steps = method.partition("@")
    return f"teacher ({steps} step{'s' if steps != '1' else ''})" if steps else METHOD_NAMES.get(base, base)
COLUMNS = ["method", "B", "engine", "finding F1", "SemScore", "BLEU-4", "ROUGE-L", "validity",
           "p50 ms", "p95 ms", "tok/s", "fwd/report", "tok/fwd", "speed-up vs AR", "reports/s @batch", "peak MB"]


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if v != v:  # nan
            return "nan"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def _q(c: dict, key: str) -> str:
    v = (c.get("quality") or {}).get(key)
    return _f(v) if not (isinstance(v, str) and len(v) > 40) else v[:60] + ("…" if len(v) > 60 else "")


def cell_row(c: dict) -> list[str]:
    head = [method_name(c["method"]), _f(c.get("block_size")), c["engine"]]
    if c.get("status") != "ok":
        return head + [c.get("status", "?")] + ["–"] * (len(COLUMNS) - 4)
    tp = c.get("throughput") or {}
    tps = f"{tp['reports_per_s']:.2f} @{tp['batch']}" if "reports_per_s" in tp else (tp.get("status") or "–")
    sp = c.get("speedup_vs_ar")
    peak = c.get("cuda_max_allocated_mb") or c.get("peak_rss_mb")
    peak_s = _f(peak) + (" (cuda)" if c.get("cuda_max_allocated_mb") else "")
    return head + [
        _q(c, "finding_f1"), _q(c, "semscore"), _q(c, "bleu4"), _q(c, "rougeL"), _q(c, "valid_sentence_rate"),
        _f(c["latency_ms"]["p50"]), _f(c["latency_ms"]["p95"]), _f(c["tokens_per_s"]),
        _f(c["forward_passes_per_report"]), _f(c["tokens_per_forward"], 2),
        (f"{sp:.2f}x" if sp else "–"), tps, peak_s,
    ]


def unavailable(c: dict) -> bool:
    """A cell that cannot run here (missing engine, backend or graph), as opposed to one that ran or failed."""
    return c.get("status", "").startswith(NA)


def cell_rows(cells: list[dict]) -> list[list[str]]:
    """One row per cell that ran or failed; the unavailable ones are listed under the table."""
    return [cell_row(c) for c in cells if not unavailable(c)]


def unavailable_lines(cells: list[dict]) -> list[str]:
    """The cells that cannot run here, one line per reason: "- which cells: why"."""
    by_reason: dict[str, list[dict]] = {}
    for c in cells:
        if unavailable(c):
            by_reason.setdefault(c["status"][len(NA):], []).append(c)
    return [f"- {_which(cells, group)}: {reason}" for reason, group in by_reason.items()]


def _which(cells: list[dict], group: list[dict]) -> str:
    """Short names for a set of cells: whole engines first, then methods x block sizes x engines."""
    engines = list(dict.fromkeys(c["engine"] for c in cells))
    ids = {id(c) for c in group}
    whole = [e for e in engines if all(id(c) in ids for c in cells if c["engine"] == e)]
    parts = [f"every method on {', '.join(whole)}"] if whole else []
    # the rest: methods that share their block sizes and engines are named together
    rest = [c for c in group if c["engine"] not in whole]
    by_method: dict[str, list[dict]] = {}
    for c in rest:
        by_method.setdefault(c["method"], []).append(c)
    shared: dict[tuple, list[str]] = {}
    for m, cs in by_method.items():
        bs = tuple(dict.fromkeys(c.get("block_size") for c in cs))
        es = tuple(dict.fromkeys(c["engine"] for c in cs))
        if len(cs) == len(bs) * len(es):  # every block size on every engine
            shared.setdefault((bs, es), []).append(method_name(m))
        else:
            parts += [f"{method_name(m)}{_blocks((c.get('block_size'),))} on {c['engine']}" for c in cs]
    parts += [f"{', '.join(names)}{_blocks(bs)} on {', '.join(es)}" for (bs, es), names in shared.items()]
    return "; ".join(parts)


def _blocks(bs: tuple) -> str:
    named = [str(b) for b in bs if b is not None]
    return f" B={', '.join(named)}" if named else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ideal_table(result: dict) -> str:
    rows = []
    for r in result.get("ideal_speedup", []):
        if r.get("status") != "ok":
            rows.append([r["engine"], "–", r.get("status", ""), "–", "–", "–", "–", "–", "–"])
            continue
        t = r["t_ms"]
        for B, ideal in sorted(r["ideal"].items(), key=lambda kv: int(kv[0])):
            ach = (r.get("achieved_dcd_vs_ar") or {}).get(B)
            dec = (r.get("achieved_dcd_vs_ar_decode_only") or {}).get(B)
            loop = r.get("in_loop_t_ms") or {}
            loop_s = (f"{_f(loop.get('1'), 3)} / {_f(loop.get(str(2 * int(B))), 3)}"
                      if loop.get("1") or loop.get(str(2 * int(B))) else "–")
            rows.append([r["engine"], B, _f(t.get("1"), 3), _f(t.get(str(2 * int(B))), 3), loop_s, f"{ideal:.2f}x",
                         f"{ach:.2f}x" if ach else "–", f"{ach / ideal:.0%}" if ach else "–",
                         f"{dec:.2f}x" if dec else "not measured", f"{dec / ideal:.0%}" if dec else "–"])
    return _table(["engine", "B", "t(1 token) ms", "t(2B tokens) ms", "in the loops: t(1) / t(2B) ms",
                   "ideal B·t(1)/t(2B)", "achieved DCD/AR tok/s", "achieved / ideal", "achieved, decode only",
                   "decode only / ideal"], rows)


def f1_vs_ar_table(result: dict) -> str:
    """Every one-step and teacher cell against AR on the same studies (paired bootstrap)."""
    rows = []
    for c in result["cells"]:
        d = c.get("finding_f1_vs_ar")
        if not d:
            continue
        ci = d.get("ci95")
        rows.append([method_name(c["method"]), _f(c.get("block_size")), c["engine"],
                     _q(c, "finding_f1"), f"{100 * d['delta']:+.1f}",
                     f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "not computed (bootstrap off)",
                     d["ar_engine"]])
    if not rows:
        return "No cell to compare with AR."
    return _table(["method", "B", "engine", "finding F1", "ΔF1 vs AR (points)", "95% CI (paired)", "AR cell"], rows)


SWEEP_COLUMNS = ["B", "steps / block", "method", "engine", "finding F1", "SemScore", "validity", "ΔF1 vs AR (points)",
                 "tok/s", "fwd/report", "tok/fwd", "p50 ms"]


def sweep_cells(result: dict) -> list[dict]:
    """The steps sweep's cells that ran, with the one-step rows of the same engines beside them:
    teacher@k and the B-step teacher, naive one-step (the teacher's weights at 1 step) and the DCD student."""
    td = result.get("teacher_decoding") or {}
    engines = td.get("sweep_engines") or []
    if not td.get("sweep_steps"):
        return []
    keep = [c for c in result["cells"] if c["engine"] in engines and c.get("status") == "ok" and c["method"] != "ar"]
    order = {"dcd": 0, "naive": 1}
    return sorted(keep, key=lambda c: (c["engine"], c["block_size"] or 0, order.get(c["method"], 2),
                                       c.get("steps") or 0))


def sweep_table(result: dict) -> str:
    """Quality, validity, speed and passes per step count (the speed/quality curve of the teacher)."""
    td = result.get("teacher_decoding") or {}
    if not td.get("sweep_steps"):
        return "No steps sweep in this run (echo-bench --teacher-steps 1,2,4 adds it)."
    rows = []
    for c in sweep_cells(result):
        d = c.get("finding_f1_vs_ar")
        rows.append([_f(c["block_size"]), _f(c.get("steps")), method_name(c["method"]), c["engine"],
                     _q(c, "finding_f1"), _q(c, "semscore"), _q(c, "valid_sentence_rate"),
                     f"{100 * d['delta']:+.1f}" if d else "–", _f(c["tokens_per_s"]),
                     _f(c["forward_passes_per_report"]), _f(c["tokens_per_forward"], 2), _f(c["latency_ms"]["p50"])])
    if not rows:
        engines = ", ".join(td.get("sweep_engines") or [])
        return (f"The steps sweep ({', '.join(map(str, td['sweep_steps']))} steps on {engines}) has no cell that ran; "
                "the reasons are listed under the main table.")
    return _table(SWEEP_COLUMNS, rows)


def overhead_line(result: dict) -> str:
    o = result.get("runtime_overhead") or {}
    if "outside_session_of_decode" not in o:
        return f"Runtime overhead: {o.get('status', 'not measured')}."
    return (f"Runtime overhead ({o['cell']}): {o['outside_session_of_decode']:.1%} of the runtime's decode time is "
            f"spent outside `session.run` ({o['outside_session_of_report']:.1%} of the whole per-report time, "
            f"preprocessing and text decoding included).")


def setup_lines(result: dict) -> list[str]:
    m, cfg, th = result["machine"], result["config"], result.get("threads", {})
    gpu = m.get("gpu")
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    return [
        f"- date: {m['date']}; machine: {m['cpu']} ({m['cpus_usable']} usable of {m['cpu_count']} CPUs)"
        + (f", int8 kernels: {m['cpu_features']['int8_kind']}" if m.get("cpu_features") else "")
        + (f"; GPU: {gpu['name']} ({gpu['memory_gb']} GB, CUDA {gpu['cuda']})" if gpu else "; no GPU"),
        *[f"- engine `{d}`: int8 mode {e['int8']['mode']} (made for {e['int8']['chosen_for']} CPUs)"
          for d, e in result.get("engine_folders", {}).items() if e.get("int8")],
        f"- studies: {result['studies']['n']} from `{cfg['data']}` split `{cfg['split']}`; "
        f"max {result['cells'][0].get('max_new_tokens', cfg.get('max_new_tokens')) if result['cells'] else '?'} new tokens, greedy",
        f"- batch-1 latency: {cfg['warmup']} warm-up reports, {cfg['repeats']} timed pass(es)"
        + (f" ({rr} for onnxruntime / TensorRT)" if (rr := cfg.get("runtime_repeats")) and rr != cfg["repeats"] else "")
        + ", per-report median; "
        f"throughput: batch {cfg['throughput_batch']} over {cfg['throughput_n']} reports",
        *([f"- teacher rows: steps = B, unmasking rule `{td['rule']}`, threshold {td['threshold']}"
           + (f"; steps sweep {', '.join(map(str, td['sweep_steps']))} and B on {', '.join(td['sweep_engines'])}"
              if td.get("sweep_steps") else "")]
          if (td := result.get("teacher_decoding")) else []),
        f"- threads: torch {th.get('torch_intra_op')}, onnxruntime intra-op {th.get('ort_intra_op')}; "
        f"seed {cfg['seed']}; bootstrap n={cfg['n_boot']}",
        f"- libraries: {libs}; python {m['python']}",
        f"- command: `{result.get('command', '')}`; wall time {result.get('wall_s', 0):.0f} s",
    ]


def results_markdown(result: dict) -> str:
    cells = result["cells"]
    parts = ["# ECHO benchmark", "", *setup_lines(result), "",
             "## Quality and speed (batch 1 latency per report; speed-up = tokens/s over AR on the same engine)", "",
             _table(COLUMNS, cell_rows(cells)) if cell_rows(cells) else "No cell ran.", "",
             *([f"Not available here ({sum(map(unavailable, cells))} of {len(cells)} cells), one line per reason:", "",
                *unavailable_lines(cells), ""] if any(map(unavailable, cells)) else []),
             "finding F1: micro F1 of the rule labeler's findings; validity: share of sentences the synthetic "
             "grammar accepts; tok/fwd counts generated tokens (EOS included) per forward pass (prefill included); "
             "peak MB: peak RSS of the process during the cell (CUDA: max_memory_allocated).", "",
             "## Finding F1 against AR on the same studies", "", f1_vs_ar_table(result), "",
             "Paired bootstrap over studies (both systems scored on each resample), so the interval is that of the "
             "difference, much narrower than either score's own.", "",
             "## Teacher steps sweep: quality against speed per denoising step count", "", sweep_table(result), "",
             "The teacher (the RAD stage-2 checkpoint) decodes each block in `steps` denoising passes plus one commit "
             "pass. The naive row is the teacher's weights at one step with the commit fused into the next block's "
             "pass (one pass per block, as DCD); the DCD student is the one-step point this curve is judged against. "
             "Plot: teacher_steps.png.", "",
             "## Ideal vs achieved one-step speed-up (same run)", "", ideal_table(result), "",
             "The ideal ratio counts forward passes only. \"Achieved\" is tokens/s per report, prefill included; "
             "\"decode only\" leaves out the prefill pass (vision + prompt), a fixed cost that AR and DCD both pay once "
             "per report and that weighs more in DCD's much shorter decode (the paper's \"tokens/s without prefill\"). "
             "Measured for the runtime's engines, which time their prefill. t(1) and t(2B) time each graph alone, "
             "in back-to-back runs as a decode loop calls it; \"in the loops\" is the session time per decode pass "
             "inside the AR and DCD cells above, a check on them.", "",
             overhead_line(result), ""]
    return "\n".join(parts)
