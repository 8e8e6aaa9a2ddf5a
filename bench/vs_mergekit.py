"""Benchmark mbuild against mergekit: wall time, peak memory and bit-identity, per recipe.

    python bench/vs_mergekit.py [--size bench|tiny] [--work DIR] [--repeat N] [--recipes ties,linear]
                                [--dtypes float32,bfloat16] [--ref COMMIT] [--keep]
    python bench/vs_mergekit.py --show bench/vs_mergekit-bench.json   # reprint a saved table

For a base model and two mock fine-tunes (made once by examples/make_models.py and
kept in the work folder), each recipe (TIES, linear, SLERP) in each compute dtype (`dtype:
float32` and `dtype: bfloat16`, the output in bfloat16) is built by mbuild and by
mergekit under ``/usr/bin/time -v``; the outputs are compared tensor by tensor with
``torch.equal``. A "floor" pass per recipe (read every tensor of the recipe's input
models, add them, write the sum) puts a number on the I/O that merge has to do.
Figures are ratios measured in one run on one machine; the table goes to stdout and
the full results to
``vs_mergekit-SIZE.json`` beside the work folder. mbuild runs from a private copy of
its package (the working tree, or --ref's commit), so edits made meanwhile change nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
MERGEKIT_YAML = Path(PYTHON).with_name("mergekit-yaml")
TIME = "/usr/bin/time"

# One recipe body per benchmark, written once: mbuild's Mergefile takes mergekit's syntax,
# so both tools are handed the same text (plus mbuild's `output`). Each is run with the math
# in each of COMPUTE_DTYPES (`dtype`), the output in bfloat16 for both: the dtype the models
# are stored in.
RECIPES = {
    "ties": {
        "merge_method": "ties",
        "base_model": "{base}",
        "models": [
            {"model": "{math}", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "{code}", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
    },
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "{math}", "parameters": {"weight": 0.5}},
            {"model": "{code}", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"normalize": True},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "{math}",
        "models": [{"model": "{math}"}, {"model": "{code}"}],
        "parameters": {"t": 0.5},
    },
}
# float32: mbuild's default; bfloat16: what most mergekit configs ask for.
COMPUTE_DTYPES = ("float32", "bfloat16")
OUT_DTYPE = "bfloat16"


def main() -> int:
    """Parse the command line and run the benchmark (or, internally, the floor pass)."""
    if sys.argv[1:2] == ["--floor-pass"]:
        # --floor-pass OUT [--fsync] MODEL...
        rest = sys.argv[3:]
        models = [Path(arg) for arg in rest if arg != "--fsync"]
        code = floor_pass(models, Path(sys.argv[2]), fsync="--fsync" in rest)
        # Ended as an mbuild build ends, without interpreter teardown (torch's takes ~0.5 s):
        # the floor counts the work, not what any program can skip.
        os._exit(code)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("bench", "tiny"), default="bench", help="model size (default: bench)")
    parser.add_argument("--work", default=str(BENCH / "work"), help="work folder (default: bench/work)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the fastest is reported")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    parser.add_argument(
        "--dtypes", default=",".join(COMPUTE_DTYPES), help="compute dtypes, comma-separated (default: float32,bfloat16)"
    )
    parser.add_argument(
        "--ref",
        help="benchmark mbuild as of this git commit (read with git archive); default: a copy of the working tree",
    )
    parser.add_argument("--show", metavar="JSON", help="print the table of an earlier run's results and exit")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs (default: delete after checking)")
    args = parser.parse_args()
    if args.show:
        print_table(json.loads(Path(args.show).read_text()))
        return 0
    recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in recipes if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s): {', '.join(unknown)}")
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    if not dtypes or any(name not in ("float32", "bfloat16", "float16") for name in dtypes):
        parser.error("--dtypes takes float32, bfloat16 and float16")
    work = Path(args.work).absolute()
    source = snapshot_mbuild(work / "src", args.ref)
    results = run_benchmark(work, args.size, recipes, dtypes, max(1, args.repeat), args.keep, source)
    out = work.parent / f"vs_mergekit-{args.size}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nresults: {out}")
    return 0 if all(r["identical"] for r in results["recipes"].values()) else 1


# ---------------------------------------------------------------------------------------------
# The run


def run_benchmark(
    work: Path, size: str, recipes: list[str], dtypes: list[str], repeat: int, keep: bool, source: dict
) -> dict:
    """Make (or reuse) the family, measure the floor and every recipe in every compute dtype, and collect results."""
    load_at_start = list(os.getloadavg())
    work.mkdir(parents=True, exist_ok=True)
    family = ensure_family(work / f"models-{size}", size)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    warm_page_cache(family.values())
    model_bytes = sum(p.stat().st_size for p in (family["base"]).glob("*.safetensors"))
    log(f"family: {', '.join(family)} in {family['base'].parent} ({model_bytes / 1e6:.0f} MB of weights each)")

    floor = {}
    startup = [PYTHON, "-c", "import os, torch, safetensors; os._exit(0)"]
    samples = [timed(startup, runs, runs / f"startup-{i}.log") for i in range(repeat)]
    floor["startup"] = summarize(samples)
    log(f"startup (import torch, safetensors): {floor['startup']['wall_s']:.2f} s")
    for variant, extra in (("floor", []), ("floor+fsync", ["--fsync"])):
        samples = []
        for attempt in range(repeat):
            out = runs / f"{variant}-{attempt}.safetensors"
            command = [PYTHON, str(Path(__file__).resolve()), "--floor-pass", str(out), *extra, str(family["base"])]
            samples.append(timed(command, runs, runs / f"{variant}-{attempt}.log"))
            out.unlink(missing_ok=True)
        floor[variant] = summarize(samples)
        log(f"{variant}: {floor[variant]['wall_s']:.2f} s, {floor[variant]['max_rss_mb']:.0f} MB")

    results = {}
    for name in recipes:
        for dtype in dtypes:
            folder = runs / f"{name}-{dtype}"
            results[f"{name} {dtype}"] = run_recipe(name, dtype, family, folder, repeat, keep, Path(source["path"]))
    return {
        "machine": {**machine(), "load_average_at_start": load_at_start},
        "mbuild_source": source,
        "size": size,
        "model_bytes": model_bytes,
        "repeat": repeat,
        "compute_dtypes": dtypes,
        "out_dtype": OUT_DTYPE,
        "floor": floor,
        "recipes": results,
        "notes": [
            "wall_s: fastest of `repeat` runs of the whole command (interpreter start, imports and all);"
            " max_rss_mb: largest 'Maximum resident set size' of those runs, from /usr/bin/time -v",
            "page cache warm: every model file is read once before timing; no run reads from disk;"
            " sync before every command, so none pays for the previous one's writes",
            "mbuild cold: fresh --cache-dir, so source hashing is included;"
            " mbuild warm: same cache dir again (hashes remembered), output removed, --force;"
            " mbuild noop: then the same command without --force (nothing to do);"
            " mbuild cached: output deleted, same command (tensors come from mbuild's tensor cache);"
            " bit-identical: both the computed (warm) output and the one rebuilt from the cache equal mergekit's"
            " run single-threaded (OMP_NUM_THREADS=1, untimed; the timed mergekit runs keep its default threads)",
            "floor (per recipe): read every tensor of each of the recipe's input models (pread), add them"
            " (one fused add per extra model) in their dtype, write one safetensors file: the same bytes"
            " the merge reads and writes; x floor: wall / that recipe's floor wall",
            "floor, floor+fsync (rows): the same pass over the base model alone (add 1); floor+fsync also"
            " fsyncs it (mbuild fsyncs its outputs, mergekit does not)",
            "startup: `python -c 'import os, torch, safetensors; os._exit(0)'`, the part of every figure no tool"
            " can avoid; the floor pass and mbuild builds also end with os._exit (no interpreter teardown),"
            " mergekit ends normally",
            "ratios: mergekit/mbuild (above 1 means mbuild is faster or smaller); cpu: user+system seconds of the"
            " fastest run (steadier than wall on a shared machine)",
        ],
    }


def run_recipe(
    name: str, dtype: str, family: dict[str, Path], folder: Path, repeat: int, keep: bool, source: Path
) -> dict:
    """Build one recipe, computed in `dtype`, with mbuild (cold and warm) and mergekit, and compare the outputs."""
    folder.mkdir(parents=True)
    body = fill(RECIPES[name], {key: str(path) for key, path in family.items()})
    body.update({"dtype": dtype, "out_dtype": OUT_DTYPE})
    mergefile = folder / "Mergefile"
    mergefile.write_text(json.dumps({"targets": {name: {**body, "output": "mbuild-out"}}}, indent=2) + "\n")
    config = folder / "mergekit.yml"
    config.write_text(json.dumps(body, indent=2) + "\n")  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    mbuild_out, mergekit_out = folder / "mbuild-out", folder / "mergekit-out"
    computed_out = folder / "mbuild-computed"

    samples = {"mbuild_cold": [], "mbuild_warm": [], "mbuild_noop": [], "mbuild_cached": [], "mergekit": [], "floor": []}
    inputs = [str(family[member]) for member in members(RECIPES[name])]
    for attempt in range(repeat):
        # The floor over this recipe's own inputs: read them all, add, write one model.
        floor_out = folder / f"floor-{attempt}.safetensors"
        floor = [PYTHON, str(Path(__file__).resolve()), "--floor-pass", str(floor_out), *inputs]
        samples["floor"].append(timed(floor, folder, folder / f"floor-{attempt}.log"))
        floor_out.unlink(missing_ok=True)
        cache = folder / f"cache-{attempt}"
        build = [PYTHON, "-m", "mbuild.cli", "all", "-f", str(mergefile), "--force", "-q", "--cache-dir", str(cache)]
        shutil.rmtree(mbuild_out, ignore_errors=True)
        samples["mbuild_cold"].append(timed(build, folder, folder / f"mbuild-cold-{attempt}.log", env))
        shutil.rmtree(mbuild_out, ignore_errors=True)
        samples["mbuild_warm"].append(timed(build, folder, folder / f"mbuild-warm-{attempt}.log", env))
        # Everything is fresh now: the same command without --force must read no tensor.
        noop = [arg for arg in build if arg != "--force"]
        samples["mbuild_noop"].append(timed(noop, folder, folder / f"mbuild-noop-{attempt}.log", env))
        # Output gone (kept aside to check it), tensors still in the cache: a rebuild that computes nothing.
        shutil.rmtree(computed_out, ignore_errors=True)
        if mbuild_out.exists():
            mbuild_out.rename(computed_out)
        samples["mbuild_cached"].append(timed(noop, folder, folder / f"mbuild-cached-{attempt}.log", env))
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(mergekit_out, ignore_errors=True)
        merge = [str(MERGEKIT_YAML), str(config), str(mergekit_out), "--quiet"]
        samples["mergekit"].append(timed(merge, folder, folder / f"mergekit-{attempt}.log", env))
    # The reference bytes: mergekit single-threaded (its own bytes follow its thread count).
    # Not timed: the timed runs above keep mergekit's default threads.
    reference_out = folder / "mergekit-1-thread-out"
    shutil.rmtree(reference_out, ignore_errors=True)
    reference = timed(
        [str(MERGEKIT_YAML), str(config), str(reference_out), "--quiet"], folder, folder / "mergekit-1-thread.log",
        {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    result = {key: summarize(value) for key, value in samples.items()}
    result["dtype"] = dtype
    failed = [key for key, value in samples.items() if any(s["rc"] != 0 for s in value)]
    failed += ["mergekit (1 thread)"] if reference["rc"] != 0 else []
    if failed:
        result["identical"] = False
        result["comparison"] = {"error": f"{', '.join(failed)} failed; see the logs in {folder}"}
    else:
        result["comparison"] = compare_outputs(computed_out, reference_out)
        result["comparison_from_cache"] = compare_outputs(mbuild_out, reference_out)
        result["identical"] = result["comparison"]["identical"] and result["comparison_from_cache"]["identical"]
        # For the record: whether mergekit at its default thread count gave the same bytes.
        result["mergekit_default_threads_identical"] = compare_outputs(mergekit_out, reference_out)["identical"]
    verdict = "bit-identical" if result["identical"] else "DIFFERENT"
    walls = {key: f"{value['wall_s']:.2f} s" for key, value in result.items() if key in samples}
    log(f"{name} ({dtype}): {', '.join(f'{key} {wall}' for key, wall in walls.items())}; outputs {verdict}")
    if not keep and result["identical"]:
        for path in (mbuild_out, computed_out, mergekit_out, reference_out):
            shutil.rmtree(path, ignore_errors=True)
    return result


# Prints whether the mbuild on PYTHONPATH has its C loops built (older commits: the walk alone).
LOOPS_BUILT = """
try:
    from mbuild.methods import native
    print(native.library() is not None)
except ImportError:
    from mbuild.methods import ranking
    print(getattr(ranking, "_native", lambda: None)() is not None)
"""


def snapshot_mbuild(folder: Path, ref: str | None) -> dict:
    """A private copy of the mbuild package, so edits made to the tree during the run change nothing."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "HEAD").stdout.strip()
    if ref:
        commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
        if commit.returncode != 0:
            sys.exit(f"vs_mergekit: unknown git ref {ref!r}")
        paths = [path for path in ("mbuild", "setup.py", "pyproject.toml") if git("cat-file", "-e", f"{ref}:{path}").returncode == 0]
        archive = subprocess.run(["git", "archive", commit.stdout.strip(), *paths], cwd=ROOT, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        source = {"kind": "commit", "ref": ref, "commit": commit.stdout.strip()}
    else:
        shutil.copytree(ROOT / "mbuild", folder / "mbuild", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        for name in ("setup.py", "pyproject.toml"):
            if (ROOT / name).exists():
                shutil.copy2(ROOT / name, folder / name)
        dirty = git("status", "--porcelain", "--", "mbuild").stdout.split("\n")
        source = {"kind": "working tree", "head": head, "changed_files": [line[3:] for line in dirty if line.strip()]}
    if (folder / "setup.py").exists():
        # The optional C loops, compiled in place as `pip install -e .` does.
        subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--inplace"], cwd=folder, capture_output=True)
    # Byte-code compiled once, as an install does (mergekit's was, by pip): otherwise, where
    # PYTHONDONTWRITEBYTECODE is set, every timed build would compile mbuild again (~0.07 s).
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(folder / "mbuild")], capture_output=True, check=True)
    check = subprocess.run(
        [PYTHON, "-c", "import mbuild.cli, mbuild; print(mbuild.__file__)"],
        env={**os.environ, "PYTHONPATH": str(folder)}, cwd=folder, capture_output=True, text=True,
    )
    if check.returncode != 0 or not check.stdout.startswith(str(folder)):
        sys.exit(f"vs_mergekit: this mbuild does not import:\n{check.stderr.strip()[-2000:]}")
    source["path"] = str(folder)
    native = subprocess.run(
        [PYTHON, "-c", LOOPS_BUILT],
        env={**os.environ, "PYTHONPATH": str(folder)}, cwd=folder, capture_output=True, text=True,
    )
    source["native_loops"] = native.stdout.strip() == "True"
    loops = "with" if source["native_loops"] else "without"
    log(f"mbuild under test: {source.get('commit') or 'working tree at ' + head[:10]} (copied to {folder}; {loops} C loops)")
    return source


def members(value) -> list[str]:
    """The family members ({base}, {math}, {code}) a recipe names, each once, in order."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        found = [name for item in value for name in members(item)]
        return list(dict.fromkeys(found))
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return [value[1:-1]]
    return []


def fill(value, names: dict[str, str]):
    """The recipe with {base}/{math}/{code} replaced by the models' folders."""
    if isinstance(value, dict):
        return {key: fill(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, names) for item in value]
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return names[value[1:-1]]
    return value


def ensure_family(folder: Path, size: str) -> dict[str, Path]:
    """The base and two fine-tunes, made once and reused while family.json says they fit."""
    marker = folder / "family.json"
    names = ("base", "math", "code")
    expected = {"size": size, "architecture": "llama"}
    if marker.exists() and json.loads(marker.read_text()) == expected and all((folder / n).is_dir() for n in names):
        return {name: folder / name for name in names}
    log(f"making the {size} family in {folder} (once)")
    shutil.rmtree(folder, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "examples"))
    from make_models import make_family

    return {name: Path(path).absolute() for name, path in make_family(folder, size).items()}


def warm_page_cache(folders) -> None:
    """Read every weight file once so no measured run is the first to touch the disk."""
    for folder in folders:
        for path in Path(folder).glob("*.safetensors"):
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


# ---------------------------------------------------------------------------------------------
# Measuring


def timed(command: list[str], cwd: Path, log_path: Path, env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time -v; its wall time, peak RSS and exit status.

    Dirty pages the previous command left are written back first, so no command's time
    includes another one's writes.
    """
    os.sync()
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        completed = subprocess.run(
            [TIME, "-v", *command], cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    elapsed = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    if completed.returncode != 0:
        log(f"FAILED ({completed.returncode}): {' '.join(command)}; see {log_path}")
    return {
        "wall_s": parse_clock(wall.group(1)) if wall else elapsed,
        "cpu_s": (float(user.group(1)) if user else 0.0) + (float(system.group(1)) if system else 0.0),
        "max_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
        "rc": completed.returncode,
        "log": str(log_path),
    }


def parse_clock(text: str) -> float:
    """'1:02.34' or '1:02:03' as seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def summarize(samples: list[dict]) -> dict:
    """The fastest wall time, the largest peak RSS, and every sample."""
    fastest = min(samples, key=lambda s: s["wall_s"])
    return {
        "wall_s": fastest["wall_s"],
        "cpu_s": fastest["cpu_s"],
        "max_rss_mb": max(s["max_rss_mb"] for s in samples),
        "median_wall_s": statistics.median(s["wall_s"] for s in samples),
        "samples": samples,
    }


def compare_outputs(first: Path, second: Path) -> dict:
    """Every tensor of two model folders, compared with torch.equal (dtype and shape included)."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    found[key] = path
        return found

    left, right = tensors(first), tensors(second)
    only_left, only_right = sorted(set(left) - set(right)), sorted(set(right) - set(left))
    different = []
    for name in sorted(set(left) & set(right)):
        with safe_open(str(left[name]), framework="pt") as a_file, safe_open(str(right[name]), framework="pt") as b_file:
            a, b = a_file.get_tensor(name), b_file.get_tensor(name)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            entry = {"name": name, "dtypes": [str(a.dtype), str(b.dtype)], "shapes": [list(a.shape), list(b.shape)]}
            if a.shape == b.shape:
                diff = a.float() - b.float()
                entry["max_abs_diff"] = float(diff.abs().max()) if diff.numel() else 0.0
                entry["elements_different"] = int((diff != 0).sum())
            different.append(entry)
    return {
        "identical": not (only_left or only_right or different) and bool(left),
        "tensors": len(set(left) & set(right)),
        "only_mbuild": only_left,
        "only_mergekit": only_right,
        "different": different[:20],
        "different_count": len(different),
    }


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    except (OSError, IndexError, ValueError):
        pass
    versions = {}
    for package in ("torch", "mergekit", "safetensors"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # not installed: leave it out
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_end": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------
# The floor


def floor_pass(models: list[Path], out: Path, fsync: bool) -> int:
    """Read every tensor of each model, add them (one fused add per extra model; one model: add 1), write the sum.

    The same bytes a merge of these models reads and writes, with the least arithmetic.
    Made for one-file models (every --size here) with the same tensors in the same layout.
    """
    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    files = [next(iter(sorted(model.glob("*.safetensors")))) for model in models]
    headers = []
    for path in files:
        with open(path, "rb") as reader:
            (length,) = struct.unpack("<Q", reader.read(8))
            headers.append((length, reader.read(length)))
    length, raw_header = headers[0]
    header = json.loads(raw_header)
    header.pop("__metadata__", None)
    descriptors = [os.open(path, os.O_RDONLY) for path in files]
    try:
        with open(out, "wb") as writer:
            # Same tensors, same layout: the first input's header is the output's.
            writer.write(struct.pack("<Q", length) + raw_header)
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                inputs = []
                for fd, (size, _) in zip(descriptors, headers):
                    buffer = torch.empty(end - begin, dtype=torch.uint8)
                    view = memoryview(buffer.numpy()).cast("B")
                    done = 0
                    while done < len(view):
                        done += os.preadv(fd, [view[done:]], 8 + size + begin + done)
                    inputs.append(buffer.view(dtypes[entry["dtype"]]))
                result = inputs[0].add(1) if len(inputs) == 1 else torch.add(inputs[0], inputs[1])
                for extra in inputs[2:]:
                    result.add_(extra)
                writer.write(memoryview(result.view(torch.uint8).numpy()).cast("B"))
            if fsync:
                writer.flush()
                os.fsync(writer.fileno())
    finally:
        for fd in descriptors:
            os.close(fd)
    return 0


# ---------------------------------------------------------------------------------------------
# Output


def print_table(results: dict) -> None:
    """The results as a plain-text table on stdout."""
    floor = results["floor"]["floor"]["wall_s"]
    info = results["machine"]
    source = results["mbuild_source"]
    what = f"commit {source['commit'][:10]}" if source["kind"] == "commit" else f"working tree on {source['head'][:10]}"
    print(
        f"\nmbuild ({what}) vs mergekit {info['versions'].get('mergekit', '?')}, --size {results['size']}"
        f" ({results['model_bytes'] / 1e6:.0f} MB per model), {info['cpu']}, {info['cores']} cores,"
        f" {info['memory_gib']} GiB; fastest of {results['repeat']} run(s)"
    )
    header = (
        "recipe", "mbuild s", "mbuild MB", "no-hash s", "mergekit s", "mergekit MB", "time mk/mb", "cpu mk/mb",
        "RSS mk/mb", "floor s", "mbuild x floor", "no-hash x floor", "mergekit x floor", "bit-identical",
        "no-op s", "from-cache s",
    )
    rows = []
    for variant, data in results["floor"].items():
        rows.append((variant, f"{data['wall_s']:.2f}", f"{data['max_rss_mb']:.0f}", *[""] * 13))
    for name, data in results["recipes"].items():
        mb, warm, mk = data["mbuild_cold"], data["mbuild_warm"], data["mergekit"]
        # Older results measured one floor for all recipes (the base model alone).
        own_floor = data["floor"]["wall_s"] if "floor" in data else floor
        rows.append((
            name,
            f"{mb['wall_s']:.2f}",
            f"{mb['max_rss_mb']:.0f}",
            f"{warm['wall_s']:.2f}",
            f"{mk['wall_s']:.2f}",
            f"{mk['max_rss_mb']:.0f}",
            f"{mk['wall_s'] / mb['wall_s']:.2f}",
            f"{mk['cpu_s'] / mb['cpu_s']:.2f}",
            f"{mk['max_rss_mb'] / mb['max_rss_mb']:.2f}",
            f"{own_floor:.2f}",
            f"{mb['wall_s'] / own_floor:.2f}",
            f"{warm['wall_s'] / own_floor:.2f}",
            f"{mk['wall_s'] / own_floor:.2f}",
            "yes" if data["identical"] else "NO",
            f"{data['mbuild_noop']['wall_s']:.2f}",
            f"{data['mbuild_cached']['wall_s']:.2f}",
        ))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    line = lambda row: "  ".join(str(cell).rjust(width) if i else str(cell).ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))  # noqa: E731
    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))
    for name, data in results["recipes"].items():
        if not data["identical"]:
            both = {key: data[key] for key in ("comparison", "comparison_from_cache") if key in data}
            print(f"{name}: outputs differ: {json.dumps(both)[:800]}")


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
