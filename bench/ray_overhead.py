"""What the Ray executor costs on one machine, and what it would give on a cluster, on paper.

    python bench/ray_overhead.py                # --size bench: 3 models of 379 MB, TIES and linear
    python bench/ray_overhead.py --size tiny    # a smoke test in about a minute
    python bench/ray_overhead.py --show bench/ray_overhead-bench.json

Measured, in one run, on this machine's cores:
- each recipe built with `--executor local -j CORES` and `--executor ray` on a Ray instance of
  CORES CPUs started here before timing (a running cluster is what users have), fastest of
  `--repeat`, every run with `--force` over remembered source digests, outputs compared;
  the first build of each, which hashes the sources, is timed apart (`first_*_s`): the
  first recipe's Ray build is the cluster's first, which starts the node's warm worker;
- Ray's cost per task: CORES x 1000 empty tasks through the same cluster;
- the results storage's throughput: 512 MB written as 16 MB results and read back, verified,
  as workers and the driver do.

Then a model of a 70B TIES family on a cluster, from those parts (see `model`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))

RECIPES = {
    "ties": """
  merged:
    merge_method: ties
    base_model: {base}
    models:
      - model: {math}
        parameters: {{weight: 0.5, density: 0.5}}
      - model: {code}
        parameters: {{weight: 0.5, density: 0.5}}
    parameters: {{normalize: true}}
""",
    "linear": """
  merged:
    merge_method: linear
    models:
      - model: {math}
        parameters: {{weight: 0.5}}
      - model: {code}
        parameters: {{weight: 0.5}}
""",
}


def build(folder: Path, executor: list[str], cores: int) -> tuple[float, dict]:
    """One `mbuild all --force` run; its wall time and report."""
    command = [sys.executable, "-m", "mbuild.cli", "all", "-f", str(folder / "Mergefile"), "--force", "--json",
               "-q", "--cache-dir", str(folder / "cache"), "-j", str(cores), *executor]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return wall, json.loads(done.stdout)["targets"]


def output_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((folder / "build" / "merged").glob("*.safetensors")))


def task_cost(address: str, count: int) -> float:
    """Seconds per empty Ray task, submitted from a driver as mbuild submits its jobs."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        empty = ray.remote(lambda: None)
        ray.get([empty.remote() for _ in range(100)])  # workers started
        started = time.perf_counter()
        ray.get([empty.remote() for _ in range(count)])
        return (time.perf_counter() - started) / count
    finally:
        ray.shutdown()


def storage_throughput(folder: Path, total: int = 512 * 2**20, piece: int = 16 * 2**20) -> dict:
    """GB/s written and read back (verified) through the results storage, in results of ``piece`` bytes."""
    from mbuild.storage import SharedDirectory

    storage = SharedDirectory(folder)
    data = os.urandom(piece)
    keys = [f"{index:064x}" for index in range(total // piece)]
    started = time.perf_counter()
    digests = [storage.put(key, data) for key in keys]
    write = time.perf_counter() - started
    subprocess.run(["sync"], check=False)
    started = time.perf_counter()
    for key, digest in zip(keys, digests):
        assert storage.read(key, digest) is not None
    read = time.perf_counter() - started
    for key in keys:
        storage.delete(key)
    return {"write_GBps": total / write / 1e9, "read_GBps": total / read / 1e9}


def model(figures: dict) -> dict:
    """A 70B TIES family (3 sources of 140 GB, one 140 GB output) on 1 and on 8 nodes of this machine's kind.

    Compute: TIES's measured output bytes per core-second here, times the cores. Reads: each
    node reads its tasks' inputs from the shared filesystem (1.1 GB/s per node assumed, this
    disk's cold read rate; a shared FS gives each client about its NIC: 10-25 Gbit/s). Writes:
    each worker writes its tensors straight into the output's shards on the shared filesystem
    at the measured storage write rate (hashing included), so the driver only records digests.
    Scheduling: one task per tensor (723 tensors for Llama-2-70B), at the measured per-task
    cost. Reads and writes hide behind compute on each node, as they do here.
    """
    ties = figures["recipes"]["ties"]
    per_core = ties["output_bytes"] / (ties["local_s"] * figures["cores"])  # output bytes per core-second
    output, inputs, tensors, node_read = 140e9, 420e9, 723, 1.1e9
    node_write = figures["storage"]["write_GBps"] * 1e9
    result = {}
    for nodes in (1, 8):
        parts = {
            "compute": output / (per_core * figures["cores"] * nodes),
            "read": inputs / (node_read * nodes),
            "write": output / (node_write * nodes),
            "scheduling": tensors * figures["task_cost_s"] / nodes,
        }
        result[f"{nodes}_nodes_s"] = round(max(parts["compute"], parts["read"], parts["write"]) + parts["scheduling"])
        result[f"{nodes}_nodes_parts_s"] = {name: round(value, 1) for name, value in parts.items()}
    result["speedup"] = round(result["1_nodes_s"] / result["8_nodes_s"], 2)
    return result


def run(size: str, repeat: int, cores: int) -> dict:
    import make_models
    from ray.cluster_utils import Cluster

    family = make_models.make_family(HERE / "work" / f"models-{size}", size) if not (
        HERE / "work" / f"models-{size}" / "family.json").exists() else {
        name: HERE / "work" / f"models-{size}" / name for name in ("base", "math", "code")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cores, "include_dashboard": False})
    figures: dict = {"size": size, "cores": cores, "repeat": repeat, "recipes": {}}
    try:
        with tempfile.TemporaryDirectory(dir=HERE / "work") as scratch:
            for recipe, body in RECIPES.items():
                folders = {}
                for executor in ("local", "ray"):
                    folder = Path(scratch) / recipe / executor
                    folder.mkdir(parents=True)
                    (folder / "Mergefile").write_text("targets:\n" + body.format(**family))
                    folders[executor] = folder
                arguments = {"local": ["--executor", "local"],
                             "ray": ["--executor", "ray", "--ray-address", cluster.address]}
                first = {}  # sources hashed, and (Ray) the node's warm worker started: outside the timing
                for executor, folder in folders.items():
                    first[executor] = build(folder, arguments[executor], cores)[0]
                times: dict[str, list[float]] = {"local": [], "ray": []}
                for _ in range(repeat):
                    for executor, folder in folders.items():
                        wall, _ = build(folder, arguments[executor], cores)
                        times[executor].append(wall)
                same = output_bytes(folders["local"]) == output_bytes(folders["ray"])
                local, ray_time = min(times["local"]), min(times["ray"])
                figures["recipes"][recipe] = {
                    "local_s": round(local, 2), "ray_s": round(ray_time, 2), "ratio": round(ray_time / local, 2),
                    "samples": times, "identical": same,
                    "first_local_s": round(first["local"], 2), "first_ray_s": round(first["ray"], 2),
                    "output_bytes": len(output_bytes(folders["local"])),
                }
                print(f"{recipe}: local {local:.2f} s, ray {ray_time:.2f} s, ray/local {ray_time / local:.2f}x, "
                      f"outputs {'identical' if same else 'DIFFER'}", flush=True)
            figures["task_cost_s"] = task_cost(cluster.address, 1000 * cores)
            print(f"Ray: {figures['task_cost_s'] * 1e3:.2f} ms per empty task", flush=True)
            figures["storage"] = storage_throughput(Path(scratch) / "storage")
            print(f"results storage: write {figures['storage']['write_GBps']:.2f} GB/s, "
                  f"read {figures['storage']['read_GBps']:.2f} GB/s", flush=True)
    finally:
        cluster.shutdown()
    figures["model_70b_ties"] = model(figures)
    return figures


def show(figures: dict) -> None:
    print(f"size {figures['size']}, {figures['cores']} cores, fastest of {figures['repeat']}")
    for recipe, row in figures["recipes"].items():
        print(f"  {recipe:8} local {row['local_s']:7.2f} s  ray {row['ray_s']:7.2f} s  ray/local {row['ratio']:.2f}x  "
              f"{'identical' if row['identical'] else 'DIFFER'}")
        if "first_ray_s" in row:
            print(f"  {'':8} first builds (hashing; Ray's warm worker starting): local {row['first_local_s']:.2f} s, "
                  f"ray {row['first_ray_s']:.2f} s")
    print(f"  Ray per task: {figures['task_cost_s'] * 1e3:.2f} ms; storage write {figures['storage']['write_GBps']:.2f}"
          f" GB/s, read {figures['storage']['read_GBps']:.2f} GB/s")
    m = figures["model_70b_ties"]
    print(f"  70B TIES on paper: 1 node {m['1_nodes_s']} s {m['1_nodes_parts_s']}, 8 nodes {m['8_nodes_s']} s "
          f"{m['8_nodes_parts_s']}: {m['speedup']}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench", choices=("tiny", "bench", "large"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--show", help="reprint a saved JSON")
    args = parser.parse_args()
    if args.show:
        show(json.loads(Path(args.show).read_text()))
        return 0
    (HERE / "work").mkdir(exist_ok=True)
    figures = run(args.size, args.repeat, args.cores)
    (HERE / f"ray_overhead-{args.size}.json").write_text(json.dumps(figures, indent=2) + "\n")
    show(figures)
    return 0 if all(r["identical"] for r in figures["recipes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
