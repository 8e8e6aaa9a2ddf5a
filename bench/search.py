"""Benchmark `mbuild search` against the same merges run one after another with mergekit-yaml.

    python bench/search.py [--size bench|tiny] [--work DIR] [--trials N] [--anchors N] [--step X]
                           [--default-threads] [--keep]
    python bench/search.py --show bench/search-bench.json   # reprint a saved table

A recipe search tries many recipes that differ in a few numbers. Each trial of `mbuild search`
is an ordinary build, so a tensor whose recipe an earlier trial already computed (same models,
same per-layer `t`) comes from the cache; mergekit-yaml writes every candidate whole. This bench
puts one number on that lever, in one run, for a SLERP of two mock fine-tunes (the family
vs_mergekit.py makes) whose `t` is a gradient of a few anchors, searched by Optuna's TPE with
a fixed seed, scored by a perplexity eval target on a small generated text:

- **search**: `mbuild search blend` over TRIALS trials from a fresh cache, timed whole; its
  output splits the time into the trials' builds and their evals ("NAME done in S s" lines);
- **builds only**: the recipes the trials built (read back from the search's trials.json), as
  plain targets of one Mergefile, built by one `mbuild` from a fresh cache; then their eval
  targets by a second `mbuild all` (the merges fresh by then): the evals' own cost;
- **mergekit**: the same recipes, one `mergekit-yaml` each, one after another, under
  OMP_NUM_THREADS=1 (the thread count whose bytes are a reference; `--default-threads` times
  them again at mergekit's default); each output is compared tensor by tensor with the plain
  target's, whose tensor digests must also equal those the search recorded for its trial.

The models are random, so the perplexities mean nothing; the times are real. Results go to
``search-SIZE.json`` beside the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from vs_mergekit import (  # noqa: E402
    MERGEKIT_YAML, PYTHON, compare_outputs, ensure_family, fill, log, machine, snapshot_mbuild, timed, warm_page_cache,
)

# The searched recipe: SLERP from one fine-tune to the other, the math in float32 and the output in
# the models' bfloat16 (mergekit does SLERP's math in float32 whatever `dtype` says).
RECIPE = {
    "merge_method": "slerp",
    "base_model": "{math}",
    "models": [{"model": "{math}"}, {"model": "{code}"}],
    "parameters": {"t": 0.5},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
# Per size: trials, and the tokens of the text the perplexity is taken on.
SIZES = {"bench": {"trials": 12, "max_tokens": 512}, "tiny": {"trials": 4, "max_tokens": 128}}
WORDS = (
    "the a model merge layer tensor weight gradient search trial cache build of in on with and to from "
    "every each one two three small large new old first last fast slow reads writes keeps shares"
).split()
SEARCHED = "blend"
OBJECTIVE = "ppl"


def main() -> int:
    """Parse the command line and run the benchmark (or reprint a saved one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="bench", help="model size (default: bench)")
    parser.add_argument("--work", default=str(BENCH / "work"), help="work folder (default: bench/work)")
    parser.add_argument("--trials", type=int, help="trials of the search (default: 12; 4 for --size tiny)")
    parser.add_argument("--anchors", type=int, default=3, help="anchors of the searched t gradient (default 3)")
    parser.add_argument("--step", type=float, default=0.25, help="grid of the anchors' values; 0: continuous (default 0.25)")
    parser.add_argument("--default-threads", action="store_true", help="also time mergekit at its default thread count")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs (default: delete after checking)")
    parser.add_argument("--show", metavar="JSON", help="print the table of an earlier run's results and exit")
    args = parser.parse_args()
    if args.show:
        print_table(json.loads(Path(args.show).read_text()))
        return 0
    trials = args.trials or SIZES[args.size]["trials"]
    if trials < 1 or args.anchors < 1 or args.step < 0:
        parser.error("--trials and --anchors are at least 1, --step at least 0")
    work = Path(args.work).absolute()
    source = snapshot_mbuild(work / "src-search", None)
    results = run_benchmark(work, args, trials, source)
    out = work.parent / f"search-{args.size}{variant(args, trials)}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nresults: {out}")
    return 0 if results["identical"] else 1


def variant(args, trials: int) -> str:
    """What the results file's name adds for settings other than the defaults: "-step0", "-anchors5"."""
    parts = [f"-trials{trials}"] if trials != SIZES[args.size]["trials"] else []
    parts += [f"-anchors{args.anchors}"] if args.anchors != 3 else []
    parts += [f"-step{args.step:g}"] if args.step != 0.25 else []
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The run


def run_benchmark(work: Path, args, trials: int, source: dict) -> dict:
    """The search, the same recipes as plain targets, then with mergekit; outputs compared."""
    load_at_start = list(os.getloadavg())
    started = time.time()
    family = ensure_family(work / f"models-{args.size}", args.size)
    runs = work / "runs-search"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    warm_page_cache(family.values())
    model_bytes = sum(p.stat().st_size for p in family["base"].glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": source["path"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    max_tokens = SIZES[args.size]["max_tokens"]
    text = runs / "text.txt"
    write_text(text, max_tokens)
    recipe = fill(RECIPE, {name: str(path) for name, path in family.items()})

    search = run_search(runs / "search", recipe, text, max_tokens, trials, args, env)
    recipes = [with_t(recipe, trial["values"]["t"]) for trial in search["trials"]]
    plain = run_plain_targets(runs / "plain", recipes, text, max_tokens, env)
    mergekit = run_mergekit(runs / "mergekit", recipes, {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    default = run_mergekit(runs / "mergekit-default", recipes, env, reference=False) if args.default_threads else None

    checks = check_outputs(search, plain, mergekit, default, Path(source["path"]))
    if not args.keep and checks["identical"]:
        # The outputs and both caches (which hold the outputs' bytes too): about 8 GB at --size bench.
        written = [Path(search["output"]), runs / "search" / "cache", Path(plain["folder"]) / "cache"]
        for folder in (plain["folder"], mergekit["folder"], default and default["folder"]):
            if folder:
                written.append(Path(folder) / "out")
        for path in written:
            shutil.rmtree(path, ignore_errors=True)
    return {
        "machine": {**machine(), "load_average_at_start": load_at_start},
        "mbuild_source": source,
        "size": args.size,
        "model_bytes": model_bytes,
        "recipe": recipe,
        "space": {"t": search_space(args)},
        "trials": trials,
        "max_tokens": max_tokens,
        "search": search,
        "plain": plain,
        "mergekit_1_thread": mergekit,
        "mergekit_default_threads": default,
        "comparison": checks,
        "identical": checks["identical"],
        "run_seconds": round(time.time() - started, 1),
        "notes": [
            "wall_s, cpu_s, max_rss_mb: of the whole command, from /usr/bin/time -v (interpreter start and imports"
            " included); every model file read once before timing; sync before every command",
            "search: `mbuild search blend` from a fresh cache (sources hashed in the run); builds_s and evals_s sum"
            " the trials' 'blend done in S s' and 'ppl done in S s' lines; the rest is start-up, planning, hashing"
            " and Optuna",
            "plain: the trials' recipes as plain targets of one Mergefile, built by one `mbuild TARGETS` from a fresh"
            " cache (merges only, like mergekit), then `mbuild all` for their eval targets alone",
            "mergekit: one `mergekit-yaml config OUT --quiet` per recipe, one after another, OMP_NUM_THREADS=1"
            " (its bytes follow its thread count; one thread is the reference)",
            "identical: every mergekit output equals the plain target's tensor by tensor (torch.equal), and each"
            " plain target's tensor digests equal those the search recorded for its trial",
            "the models are random: the perplexities are meaningless; the times are what a search costs",
        ],
    }


def write_text(path: Path, tokens: int) -> None:
    """The perplexity text: seeded random words, about 4 characters for each token the eval keeps."""
    generator = random.Random(0)
    words, length = [], 0
    while length < tokens * 4:
        word = generator.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    path.write_text(" ".join(words) + "\n")


def with_t(recipe: dict, t) -> dict:
    """The recipe with one trial's `t` (a list: one value per anchor of the gradient)."""
    return {**recipe, "parameters": {**recipe["parameters"], "t": t}}


def search_space(args) -> dict:
    """The `space:` entry of `t`: a gradient of --anchors values in [0, 1], on a grid of --step."""
    space = {"low": 0, "high": 1, "anchors": args.anchors}
    return {**space, "step": args.step} if args.step else space


def run_search(folder: Path, recipe: dict, text: Path, max_tokens: int, trials: int, args, env: dict) -> dict:
    """`mbuild search blend` from a fresh cache: its time, split into builds and evals, and its trials."""
    folder.mkdir(parents=True)
    mergefile = folder / "Mergefile"
    document = {
        "targets": {
            SEARCHED: recipe,
            OBJECTIVE: {"eval": {"model": SEARCHED, "metric": "perplexity", "data": str(text), "max_tokens": max_tokens}},
        },
        "search": {
            SEARCHED: {"objective": OBJECTIVE, "sampler": "tpe", "trials": trials, "seed": 0, "space": {"t": search_space(args)}},
        },
    }
    mergefile.write_text(json.dumps(document, indent=2) + "\n")  # JSON is YAML
    command = [PYTHON, "-m", "mbuild.cli", "search", SEARCHED, "-f", str(mergefile), "--cache-dir", str(folder / "cache")]
    log(f"mbuild search: {trials} trials")
    result = timed(command, folder, folder / "search.log", env)
    if result["rc"] != 0:
        sys.exit(f"search: mbuild search failed; see {folder / 'search.log'}")
    record = json.loads((folder / "build" / "search" / SEARCHED / "trials.json").read_text())
    logged = (folder / "search.log").read_text(errors="replace")
    builds = [float(s) for s in re.findall(rf"^mbuild: {SEARCHED} done in ([\d.]+) s", logged, re.M)]
    evals = [float(s) for s in re.findall(rf"^mbuild: {OBJECTIVE} done in ([\d.]+) s", logged, re.M)]
    result.update({
        "builds_s": round(sum(builds), 2),
        "evals_s": round(sum(evals), 2),
        "build_seconds": builds,
        "eval_seconds": evals,
        "trials": record["trials"],
        "best": record["best"],
        "output": str(folder / "build" / "search" / SEARCHED / SEARCHED),
    })
    done = [t for t in record["trials"] if t["status"] == "done"]
    if len(builds) + len(evals) == 0:
        log("warning: no 'NAME done in S s' lines in the search's output: its builds/evals split is missing")
    log(f"search: {result['wall_s']:.1f} s ({result['builds_s']:.1f} s building, {result['evals_s']:.1f} s evaluating);"
        f" {len(done)} of {trials} trials scored")
    return result


def run_plain_targets(folder: Path, recipes: list[dict], text: Path, max_tokens: int, env: dict) -> dict:
    """The recipes as plain targets (one `mbuild` for the merges), then their evals alone."""
    folder.mkdir(parents=True)
    names = [f"trial-{number:02d}" for number in range(len(recipes))]
    targets = {}
    for name, recipe in zip(names, recipes):
        targets[name] = {**recipe, "output": f"out/{name}"}
        targets[f"ppl-{name}"] = {
            "eval": {"model": name, "metric": "perplexity", "data": str(text), "max_tokens": max_tokens},
            "output": f"evals/{name}",
        }
    mergefile = folder / "Mergefile"
    mergefile.write_text(json.dumps({"targets": targets}, indent=2) + "\n")
    base = [PYTHON, "-m", "mbuild.cli", "-f", str(mergefile), "--cache-dir", str(folder / "cache"), "--json"]
    log(f"mbuild: {len(recipes)} plain targets, merges only")
    merges = timed_json([*base[:3], *names, *base[3:]], folder, "merges", env)
    log(f"mbuild: their {len(recipes)} eval targets")
    evals = timed_json([*base[:3], "all", *base[3:]], folder, "evals", env)
    scores = [evals["targets"].get(f"ppl-{name}", {}).get("status") for name in names]
    log(f"plain: merges {merges['wall_s']:.1f} s, evals {evals['wall_s']:.1f} s ({scores.count('built')} evaluated)")
    return {"folder": str(folder), "targets": names, "merges": merges, "evals": evals}


def timed_json(command: list[str], folder: Path, label: str, env: dict) -> dict:
    """`timed`, with the command's stdout (its --json report) kept apart and read back."""
    report = folder / f"{label}.json"
    wrapped = ["sh", "-c", f'exec "$@" > "{report}"', "sh", *command]
    result = timed(wrapped, folder, folder / f"{label}.log", env)
    if result["rc"] != 0:
        sys.exit(f"search: {' '.join(command[2:6])} ... failed; see {folder / (label + '.log')}")
    result["targets"] = json.loads(report.read_text())["targets"]
    return result


def run_mergekit(folder: Path, recipes: list[dict], env: dict, reference: bool = True) -> dict:
    """One mergekit-yaml per recipe, one after another; each output kept for the comparison."""
    folder.mkdir(parents=True)
    threads = "1 thread" if reference else "default threads"
    log(f"mergekit ({threads}): {len(recipes)} merges")
    samples = []
    for number, recipe in enumerate(recipes):
        config = folder / f"trial-{number:02d}.yml"
        config.write_text(json.dumps(recipe, indent=2) + "\n")
        command = [str(MERGEKIT_YAML), str(config), str(folder / "out" / f"trial-{number:02d}"), "--quiet"]
        samples.append(timed(command, folder, folder / f"trial-{number:02d}.log", env))
        if samples[-1]["rc"] != 0:
            sys.exit(f"search: mergekit failed on trial {number}; see {samples[-1]['log']}")
    total = sum(s["wall_s"] for s in samples)
    log(f"mergekit ({threads}): {total:.1f} s")
    return {
        "folder": str(folder),
        "threads": threads,
        "wall_s": round(total, 2),
        "cpu_s": round(sum(s["cpu_s"] for s in samples), 2),
        "max_rss_mb": max(s["max_rss_mb"] for s in samples),
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# Checking


def check_outputs(search: dict, plain: dict, mergekit: dict, default: dict | None, source: Path) -> dict:
    """Each mergekit output against the plain target's; the plain target against the trial's digests."""
    sys.path.insert(0, str(source))
    from mbuild.search import output_digest  # the digest the search recorded, of the same code

    plain_out, rows = Path(plain["folder"]) / "out", []
    for number, trial in enumerate(search["trials"]):
        name = f"trial-{number:02d}"
        row = {
            "trial": number,
            "t": trial["values"]["t"],
            "tensors_computed": trial["tensors_computed"],
            "tensors_reused": trial["tensors_reused"],
            "plain_equals_trial": output_digest(plain_out / name) == trial["output_digest"],
            "mergekit": compare_outputs(plain_out / name, Path(mergekit["folder"]) / "out" / name),
        }
        if default is not None:
            row["mergekit_default_threads"] = compare_outputs(plain_out / name, Path(default["folder"]) / "out" / name)
        rows.append(row)
    # The one trial output the search leaves (its last), compared directly as well.
    last = f"trial-{len(rows) - 1:02d}"
    last_direct = compare_outputs(Path(search["output"]), Path(mergekit["folder"]) / "out" / last)
    identical = last_direct["identical"] and all(r["plain_equals_trial"] and r["mergekit"]["identical"] for r in rows)
    differing = [r["trial"] for r in rows if not (r["plain_equals_trial"] and r["mergekit"]["identical"])]
    log("every output equals mergekit's" if identical else f"outputs DIFFER for trials {differing}")
    return {"identical": identical, "differing_trials": differing, "last_trial_direct": last_direct, "trials": rows}


# ---------------------------------------------------------------------------------------------
# Output


def print_table(results: dict) -> None:
    """The figures as plain text on stdout."""
    info, source, search, plain = results["machine"], results["mbuild_source"], results["search"], results["plain"]
    mergekit, default = results["mergekit_1_thread"], results.get("mergekit_default_threads")
    what = f"commit {source['commit'][:10]}" if source["kind"] == "commit" else f"working tree on {source['head'][:10]}"
    trials = results["trials"]
    print(
        f"\nmbuild search ({what}) vs mergekit {info['versions'].get('mergekit', '?')}, --size {results['size']}"
        f" ({results['model_bytes'] / 1e6:.0f} MB per model), {trials} trials of SLERP t = {results['space']['t']},"
        f" perplexity on {results['max_tokens']} tokens; {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB"
    )
    rows = [
        ("mbuild search (builds + evals)", search["wall_s"], search["cpu_s"]),
        ("  of which builds (trial lines)", search["builds_s"], None),
        ("  of which evals (trial lines)", search["evals_s"], None),
        ("mbuild plain targets, merges only", plain["merges"]["wall_s"], plain["merges"]["cpu_s"]),
        ("mbuild plain targets, evals only", plain["evals"]["wall_s"], plain["evals"]["cpu_s"]),
        ("mergekit-yaml x N, 1 thread", mergekit["wall_s"], mergekit["cpu_s"]),
    ]
    if default:
        rows.append(("mergekit-yaml x N, default threads", default["wall_s"], default["cpu_s"]))
    width = max(len(row[0]) for row in rows)
    print(f"{'run'.ljust(width)}  {'wall s':>8}  {'cpu s':>8}")
    for label, wall, cpu in rows:
        print(f"{label.ljust(width)}  {wall:8.2f}  {'' if cpu is None else f'{cpu:8.2f}':>8}")
    merges = plain["merges"]["wall_s"]
    print(
        f"mergekit / mbuild merges only: {mergekit['wall_s'] / merges:.2f}x wall,"
        f" {mergekit['cpu_s'] / plain['merges']['cpu_s']:.2f}x cpu;"
        f" mergekit merges / whole search: {mergekit['wall_s'] / search['wall_s']:.2f}x;"
        f" mergekit + evals / search: {(mergekit['wall_s'] + plain['evals']['wall_s']) / search['wall_s']:.2f}x"
    )
    print(f"{'trial':>5}  {'t':<24} {'computed':>8} {'reused':>6} {'plain computed':>14} {'plain reused':>12}  {'= mergekit':>10}")
    for row, name in zip(results["comparison"]["trials"], plain["targets"]):
        target = plain["merges"]["targets"].get(name, {})
        same = "yes" if row["plain_equals_trial"] and row["mergekit"]["identical"] else "NO"
        print(
            f"{row['trial'] + 1:>5}  {str(row['t']):<24} {row['tensors_computed']:>8} {row['tensors_reused']:>6}"
            f" {target.get('tensors_computed', 0):>14} {target.get('tensors_reused', 0):>12}  {same:>10}"
        )
    total = lambda rows, key: sum(row[key] for row in rows)  # noqa: E731
    shown = results["comparison"]["trials"]
    print(f"search: {total(shown, 'tensors_computed')} tensors computed, {total(shown, 'tensors_reused')} reused;"
          f" outputs {'all equal to' if results['identical'] else 'NOT all equal to'} mergekit's (1 thread)")


if __name__ == "__main__":
    sys.exit(main())
