"""How mbuild's build time grows with model size and with the number of models merged.

    python bench/scaling.py [--work DIR]

Sizes: the same Llama layers, 4, 16 and 32 of them (examples/make_models.py sizes
small, bench, large; about 0.1, 0.4 and 0.75 GB per model). For each, a linear merge
and a TIES merge of two fine-tunes (onto the base for TIES) are built from a fresh
cache; then, at the bench size, a linear merge of 2, 3 and 4 models. Each time is
reported with the ratio to the smallest case of its series and the ratio of the
bytes involved, so linear growth reads as the two ratios moving together. Start-up
(interpreter and torch import, ~1.1 s here) is a fixed cost inside every figure. Every
input is read once before its build, and written-back (sync), as in vs_mergekit.py.
Each case is built --repeat times (default 3) and the fastest is reported, with every
sample in the JSON; "step s" is the growth since the previous case, in seconds per extra
GB per model (by size) or per extra model. Results go to scaling.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(BENCH))

from vs_mergekit import warm_page_cache  # noqa: E402


def family(work: Path, size: str, extra: int = 0) -> dict[str, Path]:
    import make_models

    root = work / f"models-{size}"
    if not (root / "family.json").exists():
        make_models.make_family(root, size)
    models = {name: root / name for name in ("base", "math", "code")}
    for index in range(extra):
        folder = root / f"extra{index}"
        if not (folder / "config.json").exists():
            make_models.make_model(folder, "llama", size, seed=10 + index, base=models["base"])
        models[f"extra{index}"] = folder
    return models


def build(work: Path, label: str, body: dict) -> float:
    folder = work / "scaling" / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "Mergefile").write_text(yaml.safe_dump({"targets": {"merged": body}}, sort_keys=False))
    # As in vs_mergekit.py: inputs read from the page cache, not the disk, and no build
    # paying for the writes the previous one left behind.
    sources = [body["base_model"]] if "base_model" in body else []
    warm_page_cache([*sources, *(entry["model"] for entry in body["models"])])
    os.sync()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mbuild", "-f", str(folder / "Mergefile"), "-q"], cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    shutil.rmtree(folder / "build", ignore_errors=True)
    return seconds


def linear(models: list[Path]) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}


def ties(base: Path, models: list[Path]) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def fastest(work: Path, label: str, body: dict, repeat: int) -> tuple[float, list[float]]:
    """The fastest of `repeat` builds (single runs here swing with the disk's writeback), and all of them."""
    samples = [round(build(work, label, body), 3) for _ in range(repeat)]
    return min(samples), samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(BENCH / "work"))
    parser.add_argument("--repeat", type=int, default=3, help="builds per case; the fastest is reported")
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    sizes = {size: family(work, size, extra=2 if size == "bench" else 0) for size in ("small", "bench", "large")}
    for method in ("linear", "ties"):
        first = previous = None
        for size, models in sizes.items():
            body = linear([models["math"], models["code"]]) if method == "linear" else ties(models["base"], [models["math"], models["code"]])
            seconds, samples = fastest(work, f"{method}-{size}", body, args.repeat)
            size_bytes = model_bytes(models["base"])
            first = first or (seconds, size_bytes)
            # Seconds per extra GB per model since the previous size: equal steps mean linear growth.
            step = round((seconds - previous[0]) / ((size_bytes - previous[1]) / 1e9), 2) if previous else None
            previous = (seconds, size_bytes)
            rows.append({"series": f"{method} by size", "case": size, "model_bytes": size_bytes, "seconds": round(seconds, 2),
                         "time_ratio": round(seconds / first[0], 2), "bytes_ratio": round(size_bytes / first[1], 2),
                         "seconds_per_extra_gb": step, "samples": samples})
    bench = sizes["bench"]
    inputs = [bench["math"], bench["code"], bench["extra0"], bench["extra1"]]
    first = previous = None
    for count in (2, 3, 4):
        seconds, samples = fastest(work, f"linear-{count}-models", linear(inputs[:count]), args.repeat)
        first = first or seconds
        step = round(seconds - previous, 2) if previous else None  # seconds per extra model
        previous = seconds
        rows.append({"series": "linear by models (bench size)", "case": f"{count} models", "model_bytes": model_bytes(bench["base"]),
                     "seconds": round(seconds, 2), "time_ratio": round(seconds / first, 2), "bytes_ratio": round(count / 2, 2),
                     "seconds_per_extra_model": step, "samples": samples})
    (BENCH / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"fastest of {args.repeat}")
    print(f"{'series':32} {'case':10} {'GB/model':>9} {'seconds':>8} {'time x':>7} {'bytes x':>8} {'step s':>7}")
    for row in rows:
        step = row.get("seconds_per_extra_gb", row.get("seconds_per_extra_model"))
        print(f"{row['series']:32} {row['case']:10} {row['model_bytes'] / 1e9:9.2f} {row['seconds']:8.2f} "
              f"{row['time_ratio']:7.2f} {row['bytes_ratio']:8.2f} {'' if step is None else format(step, '7.2f'):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
