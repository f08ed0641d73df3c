#!/usr/bin/env python
"""Render a bench_ntk.py JSON file as a Markdown table (for the README).

Example:
    python benchmarks/table.py benchmarks/results/cpu_mlp.json
"""

import argparse
import json
import sys


def render(data: dict) -> str:
    machine = data["machine"]
    methods = []
    for record in data["results"]:
        if record["method"] not in methods:
            methods.append(record["method"])
    rows = {}
    for record in data["results"]:
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
        cells = []
        for method in methods:
            record = by_method.get(method)
            if record is None:
                cells.append("")
            elif record["status"] == "ok":
                cells.append(f"{record['median_s']:.3g}")
            else:
                cells.append(record["status"].replace("skipped", "skip"))
        structured = by_method.get("structured", {})
        flops = structured.get("structured_flops", 0) / 1e9
        fraction = structured.get("fraction_of_gemm")
        share = f"{100 * fraction:.0f}%" if fraction is not None else ""
        lines.append(f"| {width} | {n} | {outputs} | {mode} | " + " | ".join(cells)
                     + f" | {flops:.1f} | {share} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    args = parser.parse_args(argv)
    with open(args.json_file) as handle:
        print(render(json.load(handle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
