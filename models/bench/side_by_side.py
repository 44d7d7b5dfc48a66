"""One sitting: `divergen bench models` on the CPU engine, then PyTorch CPU and ONNX Runtime CPU
(`reference_bench.py`), every case in its own process so each peak RSS is its own; then the
side-by-side Markdown table models/BENCHMARKS.md shows, with ratios and 1- vs 2-thread scaling.

Run by hand on a quiet machine, in the reference environment (never in CI):
    source ~/.cache/divergen-refenv/venv/bin/activate
    cargo build --release --bin divergen
    python models/bench/side_by_side.py --out sitting.jsonl > sitting.md
`--table sitting.jsonl` re-renders the table from a sitting's lines without running anything.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# DIVERGEN_BIN: another build to sit (e.g. the one before a change), same table.
DIVERGEN = os.environ.get("DIVERGEN_BIN", os.path.join(ROOT, "target", "release", "divergen"))
# (model, quantizations): the decoders run in f32 only, in every runtime.
MODELS = [("clip-vit-b-32", ("none", "int8")), ("sam-vit-b", ("none", "int8")), ("mobile-sam", ("none", "int8")),
          ("sd-turbo-unet", ("none", "int8")), ("sd-vae", ("none",)), ("taesd", ("none",))]


def ours(model, quant, threads, runs):
    cmd = [DIVERGEN, "bench", "models", "--backend", "cpu", "--threads", str(threads), "--model", model,
           "--quant", quant, "--runs", str(runs), "--json", "--sd-size", "512"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return [dict(model=model, runtime="divergen", quant=quant, threads=threads, error=r.stderr.strip()[-300:])]
    rows = []
    for line in r.stdout.splitlines():
        c = json.loads(line)
        stage = c["stage"]
        rows.append(dict(model=model, runtime="divergen", quant=quant, threads=threads, stage=stage,
                         median_ms=c["median_ms"], per_second=c["per_second"], peak_rss_mib=c["peak_mib"]))
    return rows


def reference(model, runtime, quant, threads, runs):
    env = dict(os.environ, DIVERGEN_SD_SIDES="512")
    cmd = [sys.executable, os.path.join(HERE, "reference_bench.py"), "--runs", str(runs), "--threads", str(threads),
           "--case", model, runtime, quant]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return [dict(model=model, runtime=runtime, quant=quant, threads=threads, error=r.stderr.strip()[-300:])]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def stage_key(row):
    """Ours names stages in words ("encoder 1024²", "decoder …", "step 512²"); the references by part.
    Both reduce to encoder / decoder / the side."""
    s = str(row.get("stage", ""))
    for part in ("encoder", "decoder"):
        if part in s:
            return part
    if row["model"] == "clip-vit-b-32":
        return "encoder"
    return "512"


def table(rows):
    def find(model, runtime, quant, threads, stage):
        for r in rows:
            if (r["model"], r["runtime"], r["quant"], r.get("threads")) == (model, runtime, quant, threads) \
                    and "error" not in r and stage_key(r) == stage:
                return r
        return None

    out = ["| model | stage | format | divergen 2 thr (ms) | PyTorch (ms) | ONNX Runtime (ms) | ORT ÷ divergen "
           "| divergen 1 thr (ms) | 2-thread speed-up | peak RSS divergen / ORT (MiB) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, quants in MODELS:
        stages = sorted({stage_key(r) for r in rows if r["model"] == model and "error" not in r})
        for stage in stages:
            for quant in quants:
                d2, d1 = find(model, "divergen", quant, 2, stage), find(model, "divergen", quant, 1, stage)
                pt, ort = find(model, "pytorch", quant, 2, stage), find(model, "onnxruntime", quant, 2, stage)
                if d2 is None and ort is None:
                    continue
                ms = lambda r: f"{r['median_ms']:.1f}" if r else "–"
                ratio = f"{ort['median_ms'] / d2['median_ms']:.2f}" if d2 and ort else "–"
                scaling = f"{d1['median_ms'] / d2['median_ms']:.2f}×" if d1 and d2 else "–"
                rss = lambda r: f"{r['peak_rss_mib']:.0f}" if r and r.get("peak_rss_mib") else "–"
                label = "f32" if quant == "none" else quant
                out.append(f"| {model} | {stage} | {label} | {ms(d2)} | {ms(pt)} | {ms(ort)} | {ratio} | {ms(d1)} "
                           f"| {scaling} | {rss(d2)} / {rss(ort)} |")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        out.append(f"\nfailed: {r['model']} {r['runtime']} {r['quant']} ({r.get('threads')} threads): {r['error']}")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write every case's JSON line here too")
    p.add_argument("--table", help="render the table from a sitting's JSON lines and stop")
    p.add_argument("--models", default=",".join(m for m, _ in MODELS))
    a = p.parse_args()
    if a.table:
        with open(a.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    wanted = a.models.split(",")
    rows = []
    sink = open(a.out, "w") if a.out else None
    for model, quants in MODELS:
        if model not in wanted:
            continue
        for quant in quants:
            # One thread for f32 only: the scaling column; a second pass of every case would
            # not fit a sitting.
            batch = ours(model, quant, 2, a.runs) + (ours(model, quant, 1, a.runs) if quant == "none" else [])
            for runtime in ("pytorch", "onnxruntime"):
                batch += reference(model, runtime, quant, 2, a.runs)
            for r in batch:
                print(json.dumps(r), file=sys.stderr, flush=True)
                if sink:
                    print(json.dumps(r), file=sink, flush=True)
            rows += batch
    print(table(rows))


if __name__ == "__main__":
    main()
