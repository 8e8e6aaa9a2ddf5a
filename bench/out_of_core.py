"""Models larger than memory: mbuild and mergekit on a machine smaller than the models, every source byte read once?

    python bench/out_of_core.py [--size 2g|7b] [--limit 1500M | --no-limit] [--dtype float32|bfloat16]
                                [--recipes ties,linear] [--jobs N] [--no-mergekit] [--layers N] [--keep]
                                [--work DIR] [--timeout S]
    python bench/out_of_core.py --scaling [--repeat N]  # s/GB of a warm TIES build, models of ~0.5, 1 and 2.2 GB
    python bench/out_of_core.py --dry-run-bench ...  # make the family, run the dry-run estimate, print the commands
    python bench/out_of_core.py --show bench/out_of_core-2g.json

A base model and two mock fine-tunes (bf16 Llama shapes, ~2.2 GB each for --size 2g, ~7 GB
for --size 7b) are written tensor by tensor into the work folder (bench/work/models-SIZE/,
reused; the 7b family is deleted afterwards unless --keep). Every command runs under
/work/shared/tools/memlimit (a memory cgroup in which RSS and the page cache of the files read
both count) and /usr/bin/time -v, so each has: wall time, the cgroup's peak (RSS + page
cache), the process's own peak RSS, the bytes read from disk and its exit status. Per recipe
(TIES and linear, `dtype` float32 by default, `out_dtype` bfloat16):

- the dry run's peak-memory estimate (`mbuild all --dry-run --json`, "peak_memory");
- mbuild, unlimited, page cache warm, fresh cache folder (sources hashed in the run);
- mergekit, unlimited, warm (reference time, and its bytes compared with mbuild's);
- mbuild under --limit with the page cache dropped first (--cold), fresh cache folder;
- mergekit under the same limit, cold (killed for memory or not);

and once per run: the cold-read floor (`cat` of the three models under the limit, cold) and a
cold `python -c "import torch"` under the limit (the bytes it reads are subtracted from the
build's). Ratios: bytes read / the recipe's source bytes (goal <= 1.1), limited-cold wall /
unlimited-warm wall (goal <= 1.3), estimate / measured peak RSS (goal within 25%), and the
limited output against the unlimited one, tensor by tensor (torch.equal).

mbuild runs from a private copy of the working tree's package (bench/work/src-out-of-core),
taken at the start, so edits made during the run change nothing. Results go to
bench/out_of_core-SIZE.json (or out_of_core-scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from vs_mergekit import RECIPES, compare_outputs, fill, log, machine, members, parse_clock, snapshot_mbuild  # noqa: E402

ROOT = BENCH.parent
PYTHON = sys.executable
MERGEKIT_YAML = Path(PYTHON).with_name("mergekit-yaml")
TIME = "/usr/bin/time"
MEMLIMIT = "/work/shared/tools/memlimit"
CGROUP_V1 = Path("/sys/fs/cgroup/memory")

# Llama shapes, bf16, untied head. 2g: TinyLlama-1.1B's (2.2 GB a model); 7b: Llama-2-7B's
# layers, 16 of its 32 (7.0 GB a model).
SHAPES = {
    "2g": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32),
}
VOCAB = 32000
DEFAULT_LIMIT = {"2g": "1500M", "7b": None}
# --scaling: the 2g shapes with 3, 9 and 22 layers (0.53, 1.06 and 2.2 GB a model).
SCALING_LAYERS = (3, 9, 22)
OUT_DTYPE = "bfloat16"
NOISE = 0.05  # a fine-tune's change, relative to each base tensor's scale


def main() -> int:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="2g", help="model family (default: 2g)")
    parser.add_argument("--limit", help="memory of the limited runs, e.g. 1500M (default: 1500M for 2g, none for 7b)")
    parser.add_argument("--no-limit", action="store_true", help="unlimited runs only")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default: float32)")
    parser.add_argument("--recipes", default="ties,linear", help="comma-separated subset of: ties, linear")
    parser.add_argument("--layers", type=int, help="layers per model instead of the size's (a quick check of the code path)")
    parser.add_argument("--work", default=str(BENCH / "work"), help="work folder (default: bench/work)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds any one command may run (default 1800)")
    parser.add_argument("--keep", action="store_true", help="keep outputs, and the 7b family")
    parser.add_argument("--jobs", type=int, help="mbuild's -j (default: mbuild's own, 2)")
    parser.add_argument("--no-mergekit", action="store_true", help="leave mergekit out")
    parser.add_argument("--scaling", action="store_true", help="wall time per GB of a warm TIES build at ~0.5, 1, 2 GB")
    parser.add_argument("--repeat", type=int, default=1, help="--scaling: runs of each size, the fastest kept")
    parser.add_argument("--dry-run-bench", action="store_true", help="make the family, run the estimate, print the commands")
    parser.add_argument("--show", metavar="JSON", help="print the tables of an earlier run's results and exit")
    args = parser.parse_args()
    if args.show:
        print_report(json.loads(Path(args.show).read_text()))
        return 0
    recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    if not recipes or any(name not in ("ties", "linear") for name in recipes):
        parser.error("--recipes takes ties and linear")
    limit = None if args.no_limit else (args.limit or DEFAULT_LIMIT[args.size])
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    source = snapshot_mbuild(work / "src-out-of-core", None)
    if args.scaling:
        results = run_scaling(work, args.dtype, args.timeout, source, max(1, args.repeat))
        out = BENCH / "out_of_core-scaling.json"
    else:
        results = run_benchmark(work, args, recipes, limit, source)
        tag = args.size if args.layers is None else f"{args.size}-{args.layers}L"
        tag += f"-j{args.jobs}" if args.jobs else ""
        tag += f"-{limit}" if limit and limit != DEFAULT_LIMIT[args.size] else ""
        tag += f"-{args.recipes.replace(',', '+')}" if recipes != ["ties", "linear"] else ""
        out = BENCH / f"out_of_core-{tag}{'-dry' if args.dry_run_bench else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results)
    print(f"\nresults: {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# The runs


def run_benchmark(work: Path, args, recipes: list[str], limit: str | None, source: dict) -> dict:
    """The floor, the torch import, and per recipe: estimate, unlimited warm and limited cold builds of both tools."""
    load_at_start = list(os.getloadavg())
    shapes = dict(SHAPES[args.size])
    if args.layers is not None:
        shapes["num_hidden_layers"] = args.layers
    tag = args.size if args.layers is None else f"{args.size}-{args.layers}L"
    family_folder = work / f"models-{tag}"
    family = ensure_family(family_folder, shapes)
    runs = work / f"runs-out-of-core-{tag}"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    env = {**os.environ, "PYTHONPATH": source["path"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    model_bytes = {name: weight_bytes(path) for name, path in family.items()}
    unlimited = f"{machine_memory_mb()}M"
    log(f"family {tag}: {', '.join(f'{n} {b / 1e9:.2f} GB' for n, b in model_bytes.items())}; limit {limit or 'none'}")
    results = {
        "machine": {**machine(), "load_average_at_start": load_at_start},
        "mbuild_source": source,
        "size": tag,
        "shapes": {**shapes, "vocab_size": VOCAB, "dtype": "bfloat16"},
        "model_bytes": model_bytes,
        "limit": limit,
        "dtype": args.dtype,
        "out_dtype": OUT_DTYPE,
        "jobs": args.jobs,
        "recipes": {},
    }
    if args.dry_run_bench:
        results["commands"] = {}
    # The floor: every byte of the three models, read once from disk by cat.
    files = [str(path) for folder in family.values() for path in sorted(folder.glob("*.safetensors"))]
    floor_limit = limit or unlimited
    if args.dry_run_bench:
        results["commands"]["floor"] = memlimit_command(["cat", *files], floor_limit, True, args.timeout)
        results["commands"]["torch_import"] = memlimit_command([PYTHON, "-c", "import torch"], floor_limit, True, args.timeout)
    else:
        results["floor"] = measure(["cat", *files], runs / "floor.log", floor_limit, True, args.timeout, quiet_stdout=True)
        log(f"cold read of the three models: {brief(results['floor'])}")
        results["torch_import"] = measure(
            [PYTHON, "-c", "import torch"], runs / "torch-import.log", floor_limit, True, args.timeout, env=env
        )
        log(f"cold torch import: {brief(results['torch_import'])}")
    for name in recipes:
        results["recipes"][name] = run_recipe(
            name, family, model_bytes, runs / name, limit, unlimited, args, env, results
        )
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["notes"] = NOTES
    if not args.keep:
        shutil.rmtree(runs, ignore_errors=True)
        if args.size == "7b":
            log(f"deleting the 7b family in {family_folder} (--keep keeps it)")
            shutil.rmtree(family_folder, ignore_errors=True)
    return results


def run_recipe(
    name: str, family: dict[str, Path], model_bytes: dict[str, int], folder: Path, limit: str | None,
    unlimited: str, args, env: dict, results: dict,
) -> dict:
    """One recipe: the estimate, then each tool unlimited and warm, then each under the limit and cold."""
    folder.mkdir(parents=True)
    body = fill(RECIPES[name], {key: str(path) for key, path in family.items()})
    body.update({"dtype": args.dtype, "out_dtype": OUT_DTYPE})
    mergefile = folder / "Mergefile"
    mergefile.write_text(json.dumps({"targets": {name: {**body, "output": "mbuild-out"}}}, indent=2) + "\n")
    config = folder / "mergekit.yml"
    config.write_text(json.dumps(body, indent=2) + "\n")  # JSON is YAML
    inputs = members(RECIPES[name])
    source_bytes = sum(model_bytes[member] for member in inputs)
    result: dict = {"inputs": inputs, "source_bytes": source_bytes}

    def build(cache: str) -> list[str]:
        jobs = ["-j", str(args.jobs)] if args.jobs else []
        return [PYTHON, "-m", "mbuild.cli", "all", "-f", str(mergefile), "--force", "-q", *jobs, "--cache-dir", str(folder / cache)]

    def merge(out: str) -> list[str]:
        return [str(MERGEKIT_YAML), str(config), str(folder / out), "--quiet"]

    # The estimate: a dry run (reads no tensor) with nothing built yet, so the target is stale.
    dry = subprocess.run(
        [PYTHON, "-m", "mbuild.cli", "all", "-f", str(mergefile), "--dry-run", "--json",
         *(["-j", str(args.jobs)] if args.jobs else []), "--cache-dir", str(folder / "cache-dry")],
        cwd=folder, env=env, capture_output=True, text=True,
    )
    shutil.rmtree(folder / "cache-dry", ignore_errors=True)
    try:
        row = json.loads(dry.stdout)["targets"][name]
        result["estimate"] = {key: row.get(key) for key in ("peak_memory", "largest_task_memory", "bytes_to_read", "bytes")}
    except (json.JSONDecodeError, KeyError, TypeError):
        result["estimate"] = {"error": (dry.stderr or dry.stdout)[-2000:]}
    log(f"{name}: dry-run estimate {result['estimate']}")
    if args.dry_run_bench:
        results["commands"][name] = {
            "mbuild_warm": memlimit_command(build("cache-warm"), unlimited, False, args.timeout),
            "mergekit_warm": memlimit_command(merge("mergekit-warm"), unlimited, False, args.timeout),
            **({
                "mbuild_cold": memlimit_command(build("cache-cold"), limit, True, args.timeout),
                "mergekit_cold": memlimit_command(merge("mergekit-cold"), limit, True, args.timeout),
            } if limit else {}),
        }
        return result

    out = folder / "mbuild-out"
    warm_page_cache([family[member] for member in inputs])
    result["mbuild_warm"] = measure(build("cache-warm"), folder / "mbuild-warm.log", unlimited, False, args.timeout, env=env, cwd=folder)
    log(f"{name}: mbuild unlimited warm: {brief(result['mbuild_warm'])}")
    keep_output(out, folder / "mbuild-warm-out")
    shutil.rmtree(folder / "cache-warm", ignore_errors=True)
    if not args.no_mergekit:
        warm_page_cache([family[member] for member in inputs])
        result["mergekit_warm"] = measure(merge("mergekit-warm"), folder / "mergekit-warm.log", unlimited, False, args.timeout, env=env, cwd=folder)
        log(f"{name}: mergekit unlimited warm: {brief(result['mergekit_warm'])}")
    if limit:
        result["mbuild_cold"] = measure(build("cache-cold"), folder / "mbuild-cold.log", limit, True, args.timeout, env=env, cwd=folder)
        log(f"{name}: mbuild {limit} cold: {brief(result['mbuild_cold'])}")
        keep_output(out, folder / "mbuild-cold-out")
        shutil.rmtree(folder / "cache-cold", ignore_errors=True)
        if not args.no_mergekit:
            result["mergekit_cold"] = measure(merge("mergekit-cold"), folder / "mergekit-cold.log", limit, True, args.timeout, env=env, cwd=folder)
            log(f"{name}: mergekit {limit} cold: {brief(result['mergekit_cold'])}")
            shutil.rmtree(folder / "mergekit-cold", ignore_errors=True)

    warm_out, cold_out, mergekit_out = folder / "mbuild-warm-out", folder / "mbuild-cold-out", folder / "mergekit-warm"
    if limit and result["mbuild_warm"]["rc"] == 0 and result["mbuild_cold"]["rc"] == 0:
        result["limited_vs_unlimited"] = compare_outputs(cold_out, warm_out)
        log(f"{name}: limited output equals unlimited: {result['limited_vs_unlimited']['identical']}")
    if not args.no_mergekit and result["mbuild_warm"]["rc"] == 0 and result["mergekit_warm"]["rc"] == 0:
        result["mbuild_vs_mergekit"] = compare_outputs(warm_out, mergekit_out)
        log(f"{name}: mbuild output equals mergekit's: {result['mbuild_vs_mergekit']['identical']}")
    result["ratios"] = ratios(result, results.get("torch_import"))
    if not args.keep:
        for path in (warm_out, cold_out, mergekit_out, out):
            shutil.rmtree(path, ignore_errors=True)
    return result


def ratios(result: dict, torch_import: dict | None) -> dict:
    """The issue's three goals as ratios, from one recipe's measurements."""
    found = {}
    warm, cold = result.get("mbuild_warm"), result.get("mbuild_cold")
    if cold and torch_import and cold["rc"] == 0:
        # The cold torch import is counted apart: a first build reads it once whatever it does.
        # (A build killed midway read less than its sources: no ratio.)
        found["read_over_source"] = (cold["read_bytes"] - torch_import["read_bytes"]) / result["source_bytes"]
        found["read_over_source_with_import"] = cold["read_bytes"] / result["source_bytes"]
    if cold and warm and cold["rc"] == 0 and warm["rc"] == 0:
        found["cold_limited_over_warm"] = cold["wall_s"] / warm["wall_s"]
    peak = (result.get("estimate") or {}).get("peak_memory")
    if peak and warm and warm["rc"] == 0 and warm.get("max_rss_bytes"):
        found["estimate_over_rss"] = peak / warm["max_rss_bytes"]
    mergekit = result.get("mergekit_warm")
    if mergekit and warm and mergekit["rc"] == 0 and warm["rc"] == 0:
        found["mergekit_over_mbuild_warm"] = mergekit["wall_s"] / warm["wall_s"]
    return found


def run_scaling(work: Path, dtype: str, timeout: int, source: dict, repeat: int = 1) -> dict:
    """A warm, unlimited TIES build (fresh cache) of the 2g shapes at 3, 9 and 22 layers: seconds per GB.

    With repeat > 1 the sizes are interleaved, round after round, and the fastest of each is kept.
    """
    env = {**os.environ, "PYTHONPATH": source["path"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    unlimited = f"{machine_memory_mb()}M"
    families = {}
    for layers in SCALING_LAYERS:
        shapes = {**SHAPES["2g"], "num_hidden_layers": layers}
        tag = "2g" if layers == SHAPES["2g"]["num_hidden_layers"] else f"2g-{layers}L"
        families[layers] = ensure_family(work / f"models-{tag}", shapes)
    samples: dict[int, list[dict]] = {layers: [] for layers in SCALING_LAYERS}
    for attempt in range(repeat):
        for layers, family in families.items():
            folder = work / f"runs-out-of-core-scaling-{layers}L"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            body = fill(RECIPES["ties"], {key: str(path) for key, path in family.items()})
            body.update({"dtype": dtype, "out_dtype": OUT_DTYPE})
            (folder / "Mergefile").write_text(json.dumps({"targets": {"ties": {**body, "output": "out"}}}, indent=2) + "\n")
            warm_page_cache(family.values())
            command = [PYTHON, "-m", "mbuild.cli", "all", "-f", str(folder / "Mergefile"), "--force", "-q", "--cache-dir", str(folder / "cache")]
            sample = measure(command, folder / "build.log", unlimited, False, timeout, env=env, cwd=folder)
            sample.pop("timeline", None)
            samples[layers].append(sample)
            log(f"scaling: {layers} layers, run {attempt + 1}: {brief(sample)}, cpu {sample.get('cpu_s')} s")
            shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for layers, family in families.items():
        gigabytes = weight_bytes(family["base"]) / 1e9
        fastest = min(samples[layers], key=lambda sample: sample["wall_s"] if sample["rc"] == 0 else float("inf"))
        rows.append({
            "layers": layers, "model_gb": gigabytes, **fastest, "s_per_gb": fastest["wall_s"] / gigabytes,
            "cpu_s_per_gb": (fastest["cpu_s"] or 0) / gigabytes, "samples": samples[layers],
        })
    for before, after in zip(rows, rows[1:]):
        after["step_s_per_gb"] = (after["wall_s"] - before["wall_s"]) / (after["model_gb"] - before["model_gb"])
        after["step_cpu_s_per_gb"] = ((after["cpu_s"] or 0) - (before["cpu_s"] or 0)) / (after["model_gb"] - before["model_gb"])
    return {
        "machine": machine(), "mbuild_source": source, "dtype": dtype, "repeat": repeat, "scaling": rows, "notes": NOTES,
    }


NOTES = [
    "every command runs under /work/shared/tools/memlimit (a memory cgroup: RSS and the page cache of files read"
    " both count) and /usr/bin/time -v; wall_s from time -v, cgroup_peak_mb from memlimit (RSS + page cache),"
    " max_rss_mb the process's own peak from time -v, read_bytes memlimit's bytes read from disk (ru_inblock)",
    "unlimited: the cgroup's limit is the machine's memory; warm: every input read once just before;"
    " cold: memlimit --cold (page cache dropped first); rc 137: killed for memory; 124: --timeout",
    "mbuild runs `python -m mbuild.cli all -f Mergefile --force -q --cache-dir FRESH` (sources hashed in the run);"
    " mergekit `mergekit-yaml config.yml OUT --quiet`",
    "read_over_source: (build's bytes read - cold torch import's) / the recipe's source bytes (TIES: 3 models,"
    " linear: 2); cold_limited_over_warm: limited cold wall / unlimited warm wall;"
    " estimate_over_rss: dry run's peak_memory / unlimited build's max RSS",
    "timeline: samples every 0.5 s of the cgroup (usage, rss, cache) and of bytes read by its processes"
    " (/proc/PID/io read_bytes), [t_s, usage_mb, rss_mb, cache_mb, read_mb]",
]


# ---------------------------------------------------------------------------------------------
# Measuring


def memlimit_command(command: list[str], limit: str, cold: bool, timeout: int) -> list[str]:
    """The command under memlimit, `timeout` and /usr/bin/time -v (in that order, outside in)."""
    return [MEMLIMIT, limit, *(["--cold"] if cold else []), "--", "timeout", str(timeout), TIME, "-v", *command]


def measure(
    command: list[str], log_path: Path, limit: str, cold: bool, timeout: int,
    env: dict | None = None, cwd: Path | None = None, quiet_stdout: bool = False,
) -> dict:
    """Run a command in a memory cgroup of `limit`; its wall, peaks, bytes read, exit status and a timeline."""
    os.sync()
    load = list(os.getloadavg())
    full = memlimit_command(command, limit, cold, timeout)
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(
            full, cwd=cwd, env=env, stdout=subprocess.DEVNULL if quiet_stdout else log_file, stderr=log_file
        )
        sampler = Sampler(child.pid)
        sampler.start()
        code = child.wait()
        sampler.stop()
    text = log_path.read_text(errors="replace")
    found = re.search(
        r"memlimit: limit (\d+) MB, peak (\d+) MB .*?read from disk (\d+) MB, wall ([\d.]+) s, exit (-?\d+)", text
    )
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    signal = re.search(r"Command terminated by signal (\d+)", text)
    if signal and code == 0:
        code = 128 + int(signal.group(1))
    sample = {
        "command": " ".join(command),
        "limit": limit,
        "cold": cold,
        "rc": code,
        "killed_for_memory": code == 137,
        "timed_out": code == 124,
        # memlimit's wall includes the cgroup's set-up; time -v's is the command's own (absent if killed).
        "wall_s": parse_clock(wall.group(1)) if wall else (float(found.group(4)) if found else None),
        "memlimit_wall_s": float(found.group(4)) if found else None,
        "cpu_s": float(user.group(1)) + float(system.group(1)) if user and system else None,
        "cgroup_peak_mb": int(found.group(2)) if found else None,
        "max_rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "max_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "read_bytes": int(found.group(3)) << 20 if found else None,
        "load_average_before": load,
        **sampler.summary(),
        "log": str(log_path),
    }
    if code != 0:
        log(f"exit {code}: {' '.join(command)[:200]}; see {log_path}")
    return sample


class Sampler:
    """Every 0.5 s: the cgroup's memory (usage, rss, cache) and the bytes its processes have read (memlimit's cgroup v1)."""

    def __init__(self, memlimit_pid: int):
        self.group = CGROUP_V1 / f"memlimit-{memlimit_pid}"
        self.rows: list[list[float]] = []
        self.read: dict[int, int] = {}  # pid -> read_bytes last seen (processes that exit keep their last figure)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.started = time.perf_counter()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                usage = int((self.group / "memory.usage_in_bytes").read_text())
                stat = dict(line.split() for line in (self.group / "memory.stat").read_text().splitlines())
                pids = [int(pid) for pid in (self.group / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                try:
                    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                    self.read[pid] = int(io["read_bytes"])
                except (OSError, KeyError, ValueError):
                    pass
            mb = lambda value: round(int(value) / 2**20)  # noqa: E731
            self.rows.append([
                round(time.perf_counter() - self.started, 1), mb(usage), mb(stat.get("total_rss", 0)),
                mb(stat.get("total_cache", 0)), mb(sum(self.read.values())),
            ])

    def summary(self) -> dict:
        """The sample at the cgroup's highest usage, the largest RSS seen, and the timeline (200 rows at most)."""
        if not self.rows:
            return {}
        top = max(self.rows, key=lambda row: row[1])
        step = max(1, len(self.rows) // 200)
        return {
            "at_peak_usage": {"t_s": top[0], "usage_mb": top[1], "rss_mb": top[2], "cache_mb": top[3], "read_mb": top[4]},
            "sampled_max_rss_mb": max(row[2] for row in self.rows),
            "timeline": self.rows[::step],
        }


def brief(sample: dict) -> str:
    """One line for the log."""
    wall = f"{sample['wall_s']:.1f} s" if sample.get("wall_s") is not None else "? s"
    rss = f", RSS {sample['max_rss_mb']:.0f} MB" if sample.get("max_rss_mb") else ""
    read = f", read {sample['read_bytes'] / 1e9:.2f} GB" if sample.get("read_bytes") is not None else ""
    return f"{wall}, cgroup peak {sample.get('cgroup_peak_mb')} MB{rss}{read}, exit {sample['rc']}"


def machine_memory_mb() -> int:
    """The machine's memory in MiB: the 'unlimited' runs' cgroup limit."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def warm_page_cache(folders) -> None:
    """Read every weight file once, so an unlimited run reads from the page cache."""
    for folder in folders:
        for path in sorted(Path(folder).glob("*.safetensors")):
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def keep_output(out: Path, keep_as: Path) -> None:
    """Move a build's output aside, so the next build of the same Mergefile starts without it."""
    shutil.rmtree(keep_as, ignore_errors=True)
    if out.exists():
        out.rename(keep_as)


def weight_bytes(folder: Path) -> int:
    """Bytes of a model's safetensors files."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# The family: written tensor by tensor (a few hundred MB of memory at most for 2g, ~2 GB for 7b)


def ensure_family(folder: Path, shapes: dict) -> dict[str, Path]:
    """The base and two fine-tunes, made once and reused while family.json says they fit."""
    names = ("base", "math", "code")
    marker = folder / "family.json"
    expected = {"shapes": shapes, "vocab_size": VOCAB, "noise": NOISE, "format": 1}
    if marker.exists() and json.loads(marker.read_text()) == expected and all((folder / n / "model.safetensors").exists() for n in names):
        return {name: folder / name for name in names}
    log(f"making the family in {folder} (once; {shapes['num_hidden_layers']} layers of hidden {shapes['hidden_size']})")
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    tokenizer = tokenizer_files(folder.parent)
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(llama_config(shapes), indent=2) + "\n")
        for path in tokenizer.iterdir():
            if path.name != "config.json" and path.suffix != ".safetensors":
                shutil.copy2(path, folder / name / path.name)
    write_weights([folder / name / "model.safetensors" for name in names], shapes)
    marker.write_text(json.dumps(expected) + "\n")
    log(f"family made in {time.perf_counter() - started:.0f} s")
    return {name: folder / name for name in names}


def tokenizer_files(work: Path) -> Path:
    """A folder with a small tokenizer (and generation config): the tiny family's base, made by make_models if absent."""
    tiny = work / "models-tokenizer"
    if not (tiny / "tokenizer.json").exists():
        sys.path.insert(0, str(ROOT / "examples"))
        from make_models import make_model

        shutil.rmtree(tiny, ignore_errors=True)
        make_model(tiny, size="tiny")
    return tiny


def llama_config(shapes: dict) -> dict:
    """A Llama config.json for these shapes (bf16, untied head, vocabulary padded past the small tokenizer's)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "head_dim": shapes["hidden_size"] // shapes["num_attention_heads"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": VOCAB,
        "dtype": "bfloat16",
        **shapes,
    }


def tensor_shapes(shapes: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint with these shapes."""
    hidden, mlp = shapes["hidden_size"], shapes["intermediate_size"]
    kv = shapes["num_key_value_heads"] * (hidden // shapes["num_attention_heads"])
    found = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    for layer in range(shapes["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        found.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (mlp, hidden),
            prefix + "mlp.up_proj.weight": (mlp, hidden),
            prefix + "mlp.down_proj.weight": (hidden, mlp),
        })
    return found


def write_weights(paths: list[Path], shapes: dict) -> None:
    """One safetensors file per model: the base (seeded random bf16), then fine-tunes = base + seeded noise.

    Tensors are laid out sorted by name, as safetensors' own writer does, and written one at a
    time into all the files, so memory stays at a few copies of the largest tensor.
    """
    import torch

    tensors = tensor_shapes(shapes)
    header, offset = {}, 0
    for name in sorted(tensors):
        count = 1
        for size in tensors[name]:
            count *= size
        header[name] = {"dtype": "BF16", "shape": list(tensors[name]), "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    writers = [open(path, "wb") for path in paths]
    try:
        for writer in writers:
            writer.write(struct.pack("<Q", len(raw)) + raw)
        for index, name in enumerate(sorted(tensors)):
            generator = torch.Generator().manual_seed(index)
            if len(tensors[name]) == 1:  # norms: around 1
                base = 1.0 + 0.1 * torch.randn(tensors[name], generator=generator)
            else:
                base = 0.02 * torch.randn(tensors[name], generator=generator)
            base = base.to(torch.bfloat16)
            scale = float(base.float().std()) or 1.0
            for number, writer in enumerate(writers):
                if number == 0:
                    tensor = base
                else:
                    noise = torch.randn(tensors[name], generator=torch.Generator().manual_seed(1_000_003 * number + index))
                    tensor = (base.float() + noise.mul_(NOISE * scale)).to(torch.bfloat16)
                    del noise
                writer.write(memoryview(tensor.view(torch.uint8).numpy()).cast("B"))
    finally:
        for writer in writers:
            writer.close()


# ---------------------------------------------------------------------------------------------
# Output


def print_report(results: dict) -> None:
    """The results as plain-text tables on stdout."""
    info = results["machine"]
    source = results["mbuild_source"]
    what = f"commit {source['commit'][:10]}" if source.get("kind") == "commit" else f"working tree on {source['head'][:10]}"
    print(f"\nmbuild ({what}), {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['date']}")
    if "scaling" in results:
        print("warm unlimited TIES build, fresh cache (sources hashed):")
        print(f"fastest of {results.get('repeat', 1)} run(s) per size; cpu: user+system seconds of that run")
        print(f"{'layers':>6}  {'GB/model':>8}  {'wall s':>7}  {'s/GB':>6}  {'step s/GB':>9}  {'cpu s':>6}  {'cpu s/GB':>8}  {'step cpu s/GB':>13}  {'RSS MB':>7}  rc")
        for row in results["scaling"]:
            step = f"{row['step_s_per_gb']:.2f}" if "step_s_per_gb" in row else ""
            cpu_step = f"{row['step_cpu_s_per_gb']:.2f}" if "step_cpu_s_per_gb" in row else ""
            cpu = f"{row['cpu_s']:.1f}" if row.get("cpu_s") is not None else "?"
            cpu_per = f"{row['cpu_s_per_gb']:.2f}" if "cpu_s_per_gb" in row else "?"
            rss = f"{row['max_rss_mb']:.0f}" if row.get("max_rss_mb") else "?"
            print(f"{row['layers']:>6}  {row['model_gb']:>8.2f}  {row['wall_s']:>7.1f}  {row['s_per_gb']:>6.2f}  {step:>9}  {cpu:>6}  {cpu_per:>8}  {cpu_step:>13}  {rss:>7}  {row['rc']}")
        return
    sizes = ", ".join(f"{name} {value / 1e9:.2f} GB" for name, value in results["model_bytes"].items())
    print(f"--size {results['size']} ({sizes}); limit {results['limit'] or 'none'}; dtype {results['dtype']} -> {results['out_dtype']}")
    if "commands" in results:
        print("dry run of the bench: commands it would run")
        for name, command in results["commands"].items():
            if isinstance(command, dict):
                for kind, line in command.items():
                    print(f"  {name} {kind}: {' '.join(line)[:300]}")
            else:
                print(f"  {name}: {' '.join(command)[:300]}")
        for name, data in results["recipes"].items():
            print(f"  {name} estimate: {data.get('estimate')}")
        return
    total = sum(results["model_bytes"].values())
    for key, label in (("floor", "cold read of the 3 models (cat)"), ("torch_import", "cold `import torch`")):
        if key in results:
            sample = results[key]
            rate = f", {total / 1e9 / sample['wall_s']:.2f} GB/s" if key == "floor" and sample.get("wall_s") else ""
            print(f"{label}: {brief(sample)}{rate}")
    header = ("recipe", "run", "wall s", "rc", "cgroup peak MB", "RSS MB", "read GB", "read/source", "rss at peak", "cache at peak")
    rows = []
    for name, data in results["recipes"].items():
        for run in ("mbuild_warm", "mbuild_cold", "mergekit_warm", "mergekit_cold"):
            if run not in data:
                continue
            sample = data[run]
            at = sample.get("at_peak_usage") or {}
            rows.append((
                name, run.replace("_", " "),
                f"{sample['wall_s']:.1f}" if sample.get("wall_s") is not None else "-",
                str(sample["rc"]) + (" (killed)" if sample.get("killed_for_memory") else ""),
                str(sample.get("cgroup_peak_mb")),
                f"{sample['max_rss_mb']:.0f}" if sample.get("max_rss_mb") else "-",
                f"{sample['read_bytes'] / 1e9:.2f}" if sample.get("read_bytes") is not None else "-",
                f"{sample['read_bytes'] / data['source_bytes']:.2f}" if sample.get("read_bytes") is not None else "-",
                str(at.get("rss_mb", "-")), str(at.get("cache_mb", "-")),
            ))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print("\ngoals: read/source <= 1.1 (torch import excluded), cold limited / warm unlimited <= 1.3, estimate within 25% of RSS")
    for name, data in results["recipes"].items():
        found = data.get("ratios", {})
        parts = [f"{key} {value:.2f}" for key, value in found.items()]
        estimate = (data.get("estimate") or {}).get("peak_memory")
        if estimate:
            parts.append(f"estimate {estimate / 1e6:.0f} MB")
        for key in ("limited_vs_unlimited", "mbuild_vs_mergekit"):
            if key in data:
                parts.append(f"{key} {'identical' if data[key]['identical'] else 'DIFFERENT'}")
        print(f"  {name}: {'; '.join(parts)}")


if __name__ == "__main__":
    sys.exit(main())
