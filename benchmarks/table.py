#!/usr/bin/env python
"""Render a bench_ntk.py JSON file as Markdown tables (for the README).

MLP results give one table (methods as columns); CNN and transformer results
give one table of lazykernel against the torch.func tutorial's methods, one of
lazykernel against neural-tangents when that peer ran, and, with --plans, the
plan of each workload.

Example:
    python benchmarks/table.py benchmarks/results/cpu_mlp.json
    python benchmarks/table.py benchmarks/results/cpu_cnn_transformer.json --plans
"""

import argparse
import json
import sys
from typing import Dict, List


def _cell(record) -> str:
    if record is None:
        return ""
    if record["status"] == "ok":
        return f"{record['median_s']:.3g}"
    return record["status"].replace("skipped", "skip")


def _notes(records: List[dict], where) -> List[str]:
    """One line per row and note: why cells are not times (skip, failed) and what a method
    reported beside its time (a TF32 method's error against float32)."""
    grouped: Dict[tuple, List[str]] = {}
    for record in records:
        if record.get("note"):
            label = "" if record["status"] == "ok" else record["status"].replace("skipped", "skip") + ": "
            grouped.setdefault((where(record), label + record["note"]), []).append(record["method"])
    if not grouped:
        return []
    return ["", "Notes:"] + [f"- {place}: {', '.join(methods)}: {note}"
                             for (place, note), methods in grouped.items()]


def render_mlp(data: dict, records: List[dict]) -> str:
    machine = data["machine"]
    methods = []
    for record in records:
        if record["method"] not in methods:
            methods.append(record["method"])
    rows = {}
    for record in records:
        key = (record["width"], record["n"], record["outputs"], record["mode"])
        rows.setdefault(key, {})[record["method"]] = record
    lines = [
        f"Machine: {machine['threads']} threads, torch {machine['torch']}, backend "
        f"`{machine['backend']}`, float32 GEMM rate at the start "
        f"{machine['gemm_float32_flops'] / 1e9:.0f} GFLOP/s. Command: `{data['command']}`. "
        "Median seconds; `% GEMM` is the structured method's FLOPs per second over the GEMM rate measured just before and after it; "
        "`skip` marks a method whose Jacobians would need more memory than the run allowed.",
        "",
        "| width | N | O | mode | " + " | ".join(methods) + " | structured GFLOP | % GEMM |",
        "|---:|---:|---:|---|" + "---:|" * len(methods) + "---:|---:|",
    ]
    for (width, n, outputs, mode), by_method in rows.items():
        cells = [_cell(by_method.get(method)) for method in methods]
        structured = by_method.get("structured", {})
        # every record of a row carries the structured method's count, run or not
        flops = next((r["structured_flops"] for r in by_method.values() if "structured_flops" in r), None)
        fraction = structured.get("fraction_of_gemm")
        share = f"{100 * fraction:.0f}%" if fraction is not None else ""
        lines.append(f"| {width} | {n} | {outputs} | {mode} | " + " | ".join(cells)
                     + f" | {'' if flops is None else f'{flops / 1e9:.1f}'} | {share} |")
    lines += _notes(records, lambda r: f"width {r['width']}, N {r['n']}, O {r['outputs']}, {r['mode']}")
    return "\n".join(lines)


def render_models(data: dict, records: List[dict]) -> str:
    machine = data["machine"]
    ours = [m for m in ("auto", "structured", "jacobian", "ntvp") if any(r["method"] == m for r in records)]
    tutorial = [m for m in ("tutorial-jacobian", "tutorial-ntvp") if any(r["method"] == m for r in records)]
    rows = {}
    for record in records:
        rows.setdefault((record["workload"], record["n"], record["outputs"], record["mode"]),
                        {})[record["method"]] = record
    lines = [
        f"Machine: {machine['threads']} threads, torch {machine['torch']}, backend `{machine['backend']}`, "
        f"float32 GEMM rate at the start {machine['gemm_float32_flops'] / 1e9:.0f} GFLOP/s. "
        f"Command: `{data['command']}`. Median seconds. `GFLOP` is `lazykernel.plan(...).flops` of the "
        "algorithm lazykernel chose (`plan`); `% GEMM` is those FLOPs per second over the float32 GEMM rate "
        "measured just before and after the lazykernel runs; `skip` marks a tutorial method whose "
        "Jacobians or tangents would need more memory than the run allowed.",
        "",
        "| workload | N | O | mode | " + " | ".join(f"lazykernel {m}" for m in ours)
        + " | plan | GFLOP | GEMM GFLOP/s | % GEMM | " + " | ".join(tutorial) + " |",
        "|---|---:|---:|---|" + "---:|" * len(ours) + "---|---:|---:|---:|" + "---:|" * len(tutorial),
    ]
    for (workload, n, outputs, mode), by_method in rows.items():
        first = next((by_method[m] for m in ours if m in by_method), {})
        flops = first.get("plan_flops")
        fraction = first.get("fraction_of_gemm")
        gemm = first.get("gemm_flops")
        cells = [_cell(by_method.get(m)) for m in ours]
        cells.append(first.get("plan_method", ""))
        cells.append(f"{flops / 1e9:.1f}" if flops is not None else "")
        cells.append(f"{gemm / 1e9:.0f}" if gemm else "")
        cells.append(f"{100 * fraction:.0f}%" if fraction is not None else "")
        cells += [_cell(by_method.get(m)) for m in tutorial]
        lines.append(f"| {workload} | {n} | {outputs} | {mode} | " + " | ".join(cells) + " |")
    lines += _notes(records, lambda r: f"{r['workload']}, N {r['n']}, {r['mode']}")
    return "\n".join(lines)


def render_neural_tangents(data: dict, records: List[dict]) -> str:
    if not any(r["status"] == "ok" for r in records):
        return f"neural-tangents: {records[0]['note']}" if records else ""
    peer = data["machine"].get("peer") or {}
    versions = ", ".join(f"{k} {v}" for k, v in peer.items() if k != "jax_devices")
    lines = [
        f"neural-tangents ({versions}), `empirical_ntk_fn(..., vmap_axes=0, implementation="
        "STRUCTURED_DERIVATIVES)` under `jax.jit`, on the same model with the same weights, in a worker "
        "process of its own (JAX is never loaded beside lazykernel); the two are timed alternately, run for "
        "run, after ahead-of-time compilation (`NT compile s`). `speedup` "
        "is neural-tangents' median time over lazykernel's (target ≥ 3×), `speedup at equal GEMM rate` "
        "the same scaled by the float32 GEMM rates measured around each series; `max rel. diff.` is max |K_nt − K_lazykernel| / max |K_lazykernel|.",
        "",
        "| workload | N | mode | lazykernel s | neural-tangents s | speedup | speedup at equal GEMM rate "
        "| NT compile s | max rel. diff. |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] == "ok":
            mark = "" if r.get("lazykernel_alongside", True) else " *"
            normalised = r.get("speedup_gemm_normalised")
            lines.append(f"| {r['workload']} | {r['n']} | {r['mode']} | {r['lazykernel_median_s']:.3g}{mark} | "
                         f"{r['median_s']:.3g} | {r['speedup']:.2f}× | "
                         + (f"{normalised:.2f}×" if normalised is not None else "")
                         + f" | {r['compile_s']:.3g} | {r.get('max_rel_diff', float('nan')):.1e} |")
        else:
            lines.append(f"| {r['workload']} | {r['n']} | {r['mode']} | | {r['status']}: {r['note']} | | | | |")
    if any(not r.get("lazykernel_alongside", True) for r in records if r["status"] == "ok"):
        lines.append("")
        lines.append("\\* lazykernel's own series, measured just before, had room for a single timed run within "
                     "--max-seconds, so it was not run again alongside and that series is the comparison; `speedup at equal GEMM rate` corrects for the load by the GEMM rates "
                     "measured around each series.")
    return "\n".join(lines)


def render_plans(data: dict) -> str:
    blocks = []
    for key, plan in data.get("plans", {}).items():
        blocks.append(f"`{key}`:\n\n```\n{plan['text']}\n```")
    return "\n\n".join(blocks)


def render(data: dict, plans: bool = False) -> str:
    results = data["results"]
    mlp = [r for r in results if "width" in r]
    models = [r for r in results if "workload" in r and r["method"] != "neural-tangents"]
    peer = [r for r in results if "workload" in r and r["method"] == "neural-tangents"]
    parts = []
    if mlp:
        parts.append(render_mlp(data, mlp))
    if models:
        parts.append(render_models(data, models))
    if peer:
        parts.append(render_neural_tangents(data, peer))
    if plans and data.get("plans"):
        parts.append(render_plans(data))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    parser.add_argument("--plans", action="store_true", help="also print each workload's plan")
    args = parser.parse_args(argv)
    with open(args.json_file) as handle:
        data = json.load(handle)
    if not (isinstance(data, dict) and isinstance(data.get("results"), list) and "machine" in data):
        raise SystemExit(f"{args.json_file} is not a result file of bench_ntk.py (it has no 'machine' and "
                         "'results'): table.py renders bench_ntk.py's JSON only; bench_products.py and "
                         "bench_disk.py print their own tables when they run")
    print(render(data, args.plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
