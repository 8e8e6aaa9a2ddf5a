"""Benchmark incremental rebuilds: full build vs. an edit touching 1/8 of the tensors vs. no-op.

    python bench/incremental.py [--size bench|tiny] [--work DIR] [--recipe ties|slerp]

On the benchmark family (made once by examples/make_models.py, shared with
vs_mergekit.py), one target merges the two fine-tunes onto the base. Its recipe sets a
parameter per layer with filters; the edit changes it for two of the sixteen layers
(1/8 of the layer tensors). Three timed runs of the real CLI, one after another:

- full: a fresh cache, the output built from nothing (sources hashed too);
- incremental: after the edit, only the edited layers' tensors are recomputed;
- no-op: nothing changed, nothing read.

Reports the wall times, tensors computed and reused, and the incremental/full ratio
next to the fraction of tensors the edit touched. Results go to
``incremental-SIZE.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "examples"))


def recipe(family: dict[str, Path], recipe_name: str, edited: bool) -> dict:
    """The target: a per-layer parameter by filter; the edit changes layers 0 and 1."""
    if recipe_name == "ties":
        value, edited_value = 0.5, 0.3
        key = "density"
    else:
        value, edited_value = 0.5, 0.7
        key = "t"
    rules = [{"filter": f"layers.{i}.", "value": edited_value if edited and i < 2 else value} for i in range(16)]
    rules.append({"value": value})
    if recipe_name == "ties":
        body = {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family["math"]), "parameters": {"weight": 0.5, "density": rules}},
                {"model": str(family["code"]), "parameters": {"weight": 0.5, "density": rules}},
            ],
        }
    else:
        body = {
            "merge_method": "slerp",
            "base_model": str(family["math"]),
            "models": [{"model": str(family["math"])}, {"model": str(family["code"])}],
            "parameters": {key: rules},
        }
    body.update(dtype="float32", out_dtype="bfloat16")
    return {"targets": {"merged": body}}


def run(folder: Path, *args: str) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mbuild.cli", "all", "-f", str(folder / "Mergefile"), "--json", *args],
        capture_output=True, text=True, cwd=ROOT,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"mbuild failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)["targets"]["merged"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--work", default=str(BENCH / "work"))
    parser.add_argument("--recipe", choices=("ties", "slerp"), default="ties")
    args = parser.parse_args()
    import make_models

    work = Path(args.work)
    models = work / f"models-{args.size}"
    if not (models / "family.json").exists():
        make_models.make_family(models, args.size)
    family = {name: models / name for name in ("base", "math", "code")}
    folder = work / f"incremental-{args.recipe}-{args.size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mergefile = folder / "Mergefile"

    mergefile.write_text(yaml.safe_dump(recipe(family, args.recipe, edited=False), sort_keys=False))
    full_s, full = run(folder)
    mergefile.write_text(yaml.safe_dump(recipe(family, args.recipe, edited=True), sort_keys=False))
    incremental_s, incremental = run(folder)
    noop_s, noop = run(folder)

    total = full["tensors_computed"] + full["tensors_reused"]
    touched = incremental["tensors_computed"] / total
    results = {
        "size": args.size,
        "recipe": args.recipe,
        "tensors": total,
        "full": {"seconds": round(full_s, 2), **{k: full[k] for k in ("tensors_computed", "tensors_reused")}},
        "incremental": {
            "seconds": round(incremental_s, 2),
            **{k: incremental[k] for k in ("tensors_computed", "tensors_reused")},
        },
        "noop": {"seconds": round(noop_s, 2), "status": noop["status"]},
        "fraction_touched": round(touched, 3),
        "incremental_over_full": round(incremental_s / full_s, 3),
    }
    (BENCH / f"incremental-{args.size}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.recipe} on the {args.size} family ({total} tensors)")
    print(f"  full build         {full_s:7.2f} s   {full['tensors_computed']} computed")
    print(
        f"  incremental        {incremental_s:7.2f} s   {incremental['tensors_computed']} computed, "
        f"{incremental['tensors_reused']} reused ({touched:.1%} of the tensors touched)"
    )
    print(f"  no-op              {noop_s:7.2f} s   {noop['status']}")
    print(f"  incremental / full = {incremental_s / full_s:.2f}  (fraction of tensors touched: {touched:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
