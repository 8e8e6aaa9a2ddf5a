"""The Ray executor on a real three-node Ray cluster on this machine (no mocks).

The cluster is `ray.cluster_utils.Cluster`: a head and two worker nodes, one CPU each, each a
raylet of its own with its own worker processes, so a task's node is a real scheduling
decision and removing a node kills the tasks running there. Every build is the real CLI in a
subprocess (`--executor ray --ray-address`), compared byte for byte with local builds at
-j 1 and -j 2 of the same Mergefile; every matrix of the family is past torch's grain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, grain_family, snapshot
from parity import Build

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

# Logical memory a node offers to tasks (`ray start --memory`): what `memory=` requests count against.
NODE_MEMORY = 3 * 1024**3
NODE = dict(num_cpus=1, object_store_memory=80 * 1024**2, memory=NODE_MEMORY)


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A four-layer Llama (bfloat16) and two mock fine-tunes, every matrix past torch's grain."""
    return grain_family(tmp_path_factory.mktemp("ray-family"), 4, 256, 512, 1024)


def mergefile(family) -> str:
    """Three independent targets (TIES, DARE-TIES with a seed, linear), a SLERP of two of them,
    and a frankenmerge of that SLERP whose repeated layers share keys."""
    return f"""
defaults:
  dtype: float32
  out_dtype: bfloat16
targets:
  ties:
    merge_method: ties
    base_model: {family['base']}
    models:
      - model: {family['math']}
        parameters: {{weight: 0.6, density: 0.5}}
      - model: {family['code']}
        parameters: {{weight: 0.4, density: 0.5}}
    parameters: {{normalize: true}}
  dare:
    merge_method: dare_ties
    base_model: {family['base']}
    seed: 7
    models:
      - model: {family['math']}
        parameters: {{weight: 0.5, density: 0.6}}
      - model: {family['code']}
        parameters: {{weight: 0.5, density: 0.6}}
  linear:
    merge_method: linear
    dtype: bfloat16
    models:
      - model: {family['math']}
        parameters: {{weight: 0.3}}
      - model: {family['code']}
        parameters: {{weight: 0.7}}
  blend:
    merge_method: slerp
    base_model: ties
    models:
      - model: ties
      - model: dare
    parameters: {{t: 0.3}}
  deep:
    merge_method: passthrough
    slices:
      - sources: [{{model: blend, layer_range: [0, 3]}}]
      - sources: [{{model: blend, layer_range: [1, 4]}}]
"""


def outputs(root: Path) -> dict[str, dict[str, bytes]]:
    """Every output's safetensors files and config under ``root``/build, by target, as bytes."""
    found = {
        folder.name: {name: data for name, data in snapshot(folder).items() if name.endswith((".safetensors", "config.json"))}
        for folder in sorted((root / "build").iterdir())
        if folder.is_dir() and (folder / "mbuild.json").exists()
    }
    assert found and all(any(name.endswith(".safetensors") for name in files) for files in found.values()), root
    return found


@pytest.fixture(scope="module")
def local_builds(family, tmp_path_factory):
    """The family built locally at -j 1 and -j 2: the bytes every Ray build must give."""
    made = {}
    for jobs in ("1", "2"):
        build = Build(tmp_path_factory.mktemp(f"local-j{jobs}"), mergefile(family), "--json", "-q", "-j", jobs)
        assert build.returncode == 0, build.log
        made[jobs] = build
    assert outputs(made["1"].root) == outputs(made["2"].root)
    return made


def ray_build(root: Path, family, cluster, *arguments: str, text: str | None = None,
              driver_tasks: bool = False, environment: dict | None = None) -> subprocess.Popen:
    """`mbuild all --executor ray` against the cluster, started in a subprocess (not waited for)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Mergefile").write_text(text or mergefile(family))
    # Every task to the cluster: the driver computes none while workers start (their placement is tested).
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                   "MBUILD_RAY_DRIVER_TASKS": "1" if driver_tasks else "0", **(environment or {})}
    environment.pop("MBUILD_CACHE", None)
    command = [sys.executable, "-m", "mbuild.cli", "all", "-f", str(root / "Mergefile"), "--cache-dir",
               str(root / "cache"), "--executor", "ray", "--ray-address", cluster.address, *arguments]
    return subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[dict, str]:
    """Wait for a build; its JSON report (targets) and stderr. Fails on a non-zero exit."""
    import json

    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout}\n{stderr}"
    return (json.loads(stdout)["targets"] if "--json" in process.args else {}), stderr


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read the build's stderr until a line holds ``needle``; the lines read."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no line with {needle!r} in:\n{''.join(lines)}")


def test_same_bytes_as_local_builds_with_tasks_spread_over_nodes(family, cluster, local_builds, tmp_path):
    reports, _ = finish(ray_build(tmp_path, family, cluster, "--json", "-q"))
    assert outputs(tmp_path) == outputs(local_builds["1"].root)
    nodes = set()
    for name, report in reports.items():
        local = local_builds["1"].reports[name]
        # The same work as locally: a frankenmerge's repeated layers are computed once.
        assert (report["tensors_computed"], report["tensors_reused"]) == (
            local["tensors_computed"],
            local["tensors_reused"],
        ), name
        assert sum(report["nodes"].values()) == report["tensors_computed"], name
        nodes |= set(report["nodes"])
    alive = {node["NodeID"] for node in _nodes(cluster)}
    assert nodes <= alive
    assert len(nodes) >= 2, f"tasks ran on {len(nodes)} of 3 nodes"
    assert "nodes" not in local_builds["1"].reports["ties"]  # local builds report none
    # Nothing is left in the results storage once the outputs hold the bytes.
    assert not [p for p in (tmp_path / "cache" / "results").rglob("*") if p.is_file()]


def test_the_driver_computes_while_the_workers_start(family, cluster, local_builds, tmp_path):
    """By default the driver runs tasks itself until the workers have imported torch: same bytes."""
    reports, _ = finish(ray_build(tmp_path, family, cluster, "--json", "-q", driver_tasks=True))
    assert outputs(tmp_path) == outputs(local_builds["1"].root)
    head = cluster.head_node.node_id
    on_driver = sum(r["nodes"].get(head, 0) for r in reports.values())
    assert on_driver > 0
    for name, report in reports.items():
        assert sum(report["nodes"].values()) == report["tensors_computed"], name


def test_the_example_family_builds_on_ray(families, cluster, tmp_path):
    example = (ROOT / "Mergefile.example").read_text()
    models = families("llama")["base"].parent
    (tmp_path / "local" / "examples").mkdir(parents=True)
    (tmp_path / "local" / "examples" / "models").symlink_to(models)
    local = Build(tmp_path / "local", example, "--json", "-q", "-j", "2")
    assert local.returncode == 0, local.log
    (tmp_path / "ray" / "examples").mkdir(parents=True)
    (tmp_path / "ray" / "examples" / "models").symlink_to(models)
    reports, _ = finish(ray_build(tmp_path / "ray", {}, cluster, "--json", "-q", text=example))
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert {name: r["status"] for name, r in reports.items()} == {name: "built" for name in local.reports}
    assert len({node for r in reports.values() for node in r["nodes"]}) > 1


def _nodes(cluster):
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        return [node for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()


def test_a_node_removed_mid_build(family, cluster, local_builds, tmp_path):
    process = ray_build(tmp_path, family, cluster)
    try:
        wait_for_line(process, "building ties")
        victim = next(iter(cluster.worker_nodes))
        assert process.poll() is None, "the build ended before the node could be removed"
        cluster.remove_node(victim)
        _, log = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
        if len(cluster.worker_nodes) < 2:
            cluster.add_node(**NODE)
            cluster.wait_for_nodes()
    assert outputs(tmp_path) == outputs(local_builds["1"].root)
    assert log.count("done in") == len(local_builds["1"].reports), log  # every target built in this run


def test_a_killed_driver_resumes_from_the_shared_cache(family, cluster, local_builds, tmp_path):
    process = ray_build(tmp_path, family, cluster)
    try:
        wait_for_line(process, "building dare")  # ties is published; the others' jobs are running
        time.sleep(1.0)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    reports, _ = finish(ray_build(tmp_path, family, cluster, "--json", "-q"))
    assert outputs(tmp_path) == outputs(local_builds["1"].root)
    clean = sum(r["tensors_computed"] for r in local_builds["1"].reports.values())
    resumed = sum(r["tensors_computed"] for r in reports.values())
    assert reports["ties"]["status"] == "fresh"
    # Beyond the published target, jobs the killed driver had started left their bytes behind.
    unpublished = clean - local_builds["1"].reports["ties"]["tensors_computed"]
    assert resumed < unpublished, f"the second run computed {resumed} of the {unpublished} tensors left"


def test_two_drivers_at_once(family, cluster, local_builds, tmp_path):
    first = ray_build(tmp_path, family, cluster, "--json", "-q")
    second = ray_build(tmp_path, family, cluster, "--json", "-q")
    reports = [finish(first)[0], finish(second)[0]]
    assert outputs(tmp_path) == outputs(local_builds["1"].root)
    for name in local_builds["1"].reports:
        assert {r[name]["status"] for r in reports} <= {"built", "fresh"}
    again, _ = finish(ray_build(tmp_path, family, cluster, "--json", "-q"))
    assert {r["status"] for r in again.values()} == {"fresh"}
    assert sum(r["tensors_computed"] for r in again.values()) == 0


def test_a_job_larger_than_every_node_is_refused_before_anything_runs(cluster, tmp_path):
    """Three sparse 400 MB sources: a TIES task over them needs about 3.6 GB; nodes offer 3 GiB."""
    import json

    rows, columns = 20000, 10000
    family = {}
    for name in ("base", "math", "code"):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        header = json.dumps({"lm_head.weight": {"dtype": "BF16", "shape": [rows, columns],
                                                "data_offsets": [0, rows * columns * 2]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(folder / "model.safetensors", "wb") as file:
            file.write(len(header).to_bytes(8, "little") + header)
            file.truncate(8 + len(header) + rows * columns * 2)  # sparse: no data written
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                        "model_type": "llama", "num_hidden_layers": 0}))
        family[name] = folder
    text = f"""
targets:
  huge:
    merge_method: ties
    base_model: {family['base']}
    models:
      - model: {family['math']}
        parameters: {{weight: 0.5, density: 0.5}}
      - model: {family['code']}
        parameters: {{weight: 0.5, density: 0.5}}
"""
    started = time.monotonic()
    process = ray_build(tmp_path / "work", family, cluster, text=text)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "tensor 'lm_head.weight' of target 'huge' needs about" in stderr, stderr
    assert "no node of the Ray cluster offers that" in stderr
    assert "Mergefile" in stderr  # the location: file and target
    assert not (tmp_path / "work" / "build" / "huge").exists()
    # Refused before the sources were hashed: nothing remembered, nothing cached.
    assert not list((tmp_path / "work" / "cache").glob("tensors/blobs/*"))
    assert time.monotonic() - started < 60


def planned_job(family, folder: Path, target: str, method: str, platform: str | None = None):
    """A job, as the driver makes it, for the first ``method`` task of ``target`` (on ``platform``,
    else the plan's own); and its plan."""
    from mbuild.cache import State
    from mbuild.engine import make_job
    from mbuild.mergefile import load
    from mbuild.session import Request, Session

    (folder / "Mergefile").write_text(mergefile(family))
    plan = Session(load(folder / "Mergefile"), State(folder / "cache"), Request()).plan()
    target_plan = plan.targets[target]
    task = next(t for t in target_plan.tasks if t.method == method)
    models = {i.node: {i.name: plan.sources[i.node].info.tensors[i.name]} for i in task.inputs}
    return make_job(task, target_plan, "cpu", platform or plan.platform, models), plan


def test_a_worker_on_another_compute_platform_refuses_its_job(family, cluster, tmp_path):
    import dataclasses

    from mbuild.errors import BuildError
    from mbuild.ray_workers import compute_job
    from mbuild.storage import SharedDirectory

    job, plan = planned_job(family, tmp_path, "ties", "ties", "cpu:some-other-class")
    task = job.task
    storage = SharedDirectory(tmp_path / "results")
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(ray.remote(compute_job).options(max_retries=0).remote(job, storage))
        assert isinstance(raised.value.cause, BuildError)
        assert "cpu:some-other-class" in str(raised.value.cause)
        # The same job with the plan's own platform computes, and stores, the bytes a local build writes.
        good = dataclasses.replace(job, platform=plan.platform)
        result = ray.get(ray.remote(compute_job).remote(good, storage))
    finally:
        ray.shutdown()
    assert result.computed and storage.find(task.key) == result.digest
    assert storage.keys() == [task.key]


def test_the_results_storage_verifies_what_it_reads(tmp_path):
    from mbuild.storage import SharedDirectory

    storage = SharedDirectory(tmp_path)
    data = bytes(range(256)) * 200
    digest = storage.put("ab" * 32, data)
    assert storage.find("ab" * 32) == digest
    assert bytes(storage.read("ab" * 32, digest)) == data
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    path.write_bytes(data[:-1] + b"\x00")  # damaged after it was written
    assert storage.read("ab" * 32, digest) is None
    assert storage.find("ab" * 32) is None  # dropped, so the task runs again
    assert storage.find("cd" * 32) is None


def test_without_ray_the_error_says_what_to_install(monkeypatch, tmp_path):
    from mbuild.errors import MbuildError
    from mbuild.ray_executor import RayExecutor
    from mbuild.storage import SharedDirectory

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MbuildError, match=r"pip install 'mbuild\[ray\]'"):
        RayExecutor(SharedDirectory(tmp_path))


def test_a_dry_run_shows_what_each_class_of_node_can_take(family, cluster, tmp_path):
    import json

    process = ray_build(tmp_path, family, cluster, "--dry-run", "--json")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    document = json.loads(stdout)
    (node_class,) = document["cluster"]["node_classes"]
    assert (node_class["nodes"], node_class["cpus"], node_class["memory"], node_class["gpus"]) == (3, 1, NODE_MEMORY, 0)
    assert sorted(node_class["fits"]) == sorted(document["targets"])
    for name, row in document["targets"].items():
        assert 0 < row["largest_task_memory"] < NODE_MEMORY, name
    assert document["cluster"]["cpus"] == 3
    # A dry run writes nothing: no output, no results storage.
    assert not (tmp_path / "cache" / "results").exists()
    assert not (tmp_path / "build").exists()


def test_gc_removes_results_no_target_needs(family, tmp_path):
    """Results a killed driver or a changed recipe left go; those the Mergefile needs stay."""
    import json

    from mbuild.storage import SharedDirectory

    build = Build(tmp_path, mergefile(family), "--json", "-q", "ties")
    assert build.returncode == 0, build.log
    needed = next(e["key"] for e in json.loads((tmp_path / "build" / "ties" / "mbuild.json").read_text())["tensors"].values())
    storage = SharedDirectory(tmp_path / "cache" / "results")
    storage.put(needed, b"\x00" * 64)
    storage.put("ab" * 32, b"\x01" * 64)
    partial = storage.folder / "cd" / (".cd" + "0" * 62 + ".x.partial")
    partial.write_bytes(b"\x02") if partial.parent.exists() else (partial.parent.mkdir(), partial.write_bytes(b"\x02"))
    os.utime(partial, (time.time() - 7200, time.time() - 7200))
    fresh_partial = storage.folder / "cd" / (".cd" + "1" * 62 + ".y.partial")
    fresh_partial.write_bytes(b"\x03")  # a write in progress: kept
    from conftest import run_cli

    code, out, _ = run_cli("gc", "-f", str(tmp_path / "Mergefile"), "--cache-dir", str(tmp_path / "cache"), "--json")
    assert code == 0
    assert json.loads(out)["removed_results"] == 2
    assert storage.keys() == [needed]
    assert fresh_partial.exists() and not partial.exists()


def test_an_address_nothing_answers_is_one_error_at_once(family, tmp_path):
    """Ray itself retries an unreachable address for minutes; mbuild says so in seconds."""
    started = time.monotonic()
    (tmp_path / "Mergefile").write_text(mergefile(family))
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mbuild.cli", "all", "-f", str(tmp_path / "Mergefile"), "--executor",
                           "ray", "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, env=environment,
                          timeout=120)
    assert done.returncode == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "build").exists()


def _warm_names() -> list[str]:
    """The names of the warm workers of the cluster this process is connected to."""
    from mbuild.ray_workers import NAMESPACE

    return [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == NAMESPACE and entry["name"].startswith("mbuild-warm-")]


def warm_workers(cluster, kill: bool = False) -> dict[str, int]:
    """The cluster's warm workers: name -> process id (each ``kill``ed instead, if asked)."""
    from mbuild.ray_workers import NAMESPACE

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        found = {}
        for name in _warm_names():
            actor = ray.get_actor(name, namespace=NAMESPACE)
            if kill:
                ray.kill(actor, no_restart=True)
                continue
            try:
                found[name] = ray.get(actor.ready.remote(600.0), timeout=60)
            except ray.exceptions.RayError:  # exiting: not a warm worker any more
                pass
        return found
    finally:
        ray.shutdown()


def no_warm_workers(cluster, timeout: float = 30) -> bool:
    """Wait until the cluster has no warm worker left; whether that happened in time."""
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _warm_names():
                return True
            time.sleep(0.5)
        return False
    finally:
        ray.shutdown()


def test_a_warm_cluster_builds_with_a_driver_that_never_imports_torch(family, cluster, local_builds, tmp_path):
    """Builds after the first reuse each node's warm worker (the same processes), and the driver,
    which plans and assembles, computes through its node's warm worker while its own Ray workers
    start: it never imports torch. (Copies, here the frankenmerge, run on the driver, with torch.)"""
    text = mergefile(family).split("  deep:")[0]
    computed = {name: files for name, files in outputs(local_builds["1"].root).items() if name != "deep"}
    finish(ray_build(tmp_path / "first", family, cluster, "--json", "-q", text=text, driver_tasks=True))
    before = warm_workers(cluster)
    assert before, "no warm worker after a build"
    reports, log = finish(ray_build(tmp_path / "second", family, cluster, "--json", "-q", text=text, driver_tasks=True,
                                    environment={"PYTHONPROFILEIMPORTTIME": "1"}))
    imported = [line.rsplit("|", 1)[-1].strip() for line in log.splitlines() if line.startswith("import time:")]
    assert "ray" in imported and "mbuild.engine" in imported  # the driver's imports are listed
    assert "torch" not in imported
    assert outputs(tmp_path / "second") == computed
    assert {name: r["tensors_computed"] for name, r in reports.items()} == {
        name: local_builds["1"].reports[name]["tensors_computed"] for name in computed}
    after = warm_workers(cluster)
    assert {name: pid for name, pid in after.items() if name in before} == before  # the same processes
    # With a copy to make, the driver imports torch for it, and the bytes are the same.
    reports, log = finish(ray_build(tmp_path / "second", family, cluster, "--json", "-q", driver_tasks=True,
                                    environment={"PYTHONPROFILEIMPORTTIME": "1"}))
    assert "torch" in [line.rsplit("|", 1)[-1].strip() for line in log.splitlines() if line.startswith("import time:")]
    assert outputs(tmp_path / "second") == outputs(local_builds["1"].root)
    assert reports["deep"]["status"] == "built" and reports["ties"]["status"] == "fresh"


def test_an_idle_warm_worker_exits_and_a_later_build_starts_another(family, cluster, local_builds, tmp_path):
    warm_workers(cluster, kill=True)
    assert no_warm_workers(cluster)
    finish(ray_build(tmp_path / "one", family, cluster, "-q", environment={"MBUILD_RAY_KEEP_WARM": "1"}))
    assert outputs(tmp_path / "one") == outputs(local_builds["1"].root)
    assert no_warm_workers(cluster, timeout=30), "warm workers still there 30 s after a build with 1 s to wait"
    finish(ray_build(tmp_path / "two", family, cluster, "-q"))
    assert outputs(tmp_path / "two") == outputs(local_builds["1"].root)
    assert warm_workers(cluster)


def warm_workers_ever(cluster) -> set[str]:
    """The ids of every warm worker the cluster has started, alive or not (GCS's actor table)."""
    from ray._private import state

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        return {actor_id for actor_id, actor in state.actors().items()
                if actor.get("ActorClassName", "").endswith("WarmWorker")}
    finally:
        ray.shutdown()


def test_without_warm_workers_each_task_computes_its_own_jobs(family, cluster, local_builds, tmp_path):
    warm_workers(cluster, kill=True)
    assert no_warm_workers(cluster)
    before = warm_workers_ever(cluster)
    reports, _ = finish(ray_build(tmp_path, family, cluster, "--json", "-q", environment={"MBUILD_RAY_KEEP_WARM": "0"}))
    assert outputs(tmp_path) == outputs(local_builds["1"].root)
    assert len({node for r in reports.values() for node in r["nodes"]}) >= 2
    assert warm_workers_ever(cluster) == before  # none started
    finish(ray_build(tmp_path / "warm", family, cluster, "-q"))
    assert warm_workers_ever(cluster) > before  # as a build that may keep them does


def test_a_bad_keep_warm_setting_is_one_error(family, tmp_path):
    (tmp_path / "Mergefile").write_text(mergefile(family))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MBUILD_RAY_KEEP_WARM": "soon"}
    done = subprocess.run([sys.executable, "-m", "mbuild.cli", "all", "-f", str(tmp_path / "Mergefile"), "--executor",
                           "ray", "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, env=environment,
                          timeout=120)
    assert done.returncode == 2
    assert "MBUILD_RAY_KEEP_WARM='soon'" in done.stderr
    assert not (tmp_path / "build").exists()


def test_a_relay_waiting_on_its_warm_worker_keeps_its_cpu(cluster):
    """While a relay waits for its jobs, the CPU it holds is not lent to another task on its node.

    A plain `ray.get` in a task's main thread lends it out, and the node would run more jobs
    at once than it has CPUs (a deliberate break of `_get_holding_resources` fails this).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mbuild.ray_workers import _get_holding_resources

    class Sleeper:
        def __init__(self):
            self.calls = 0

        def sleep(self, seconds):
            self.calls += 1
            time.sleep(seconds)
            return time.time()

        def called(self):
            return self.calls

    def waits(sleeper):
        started = time.time()
        return started, _get_holding_resources(sleeper.sleep.remote(3.0))

    def starts():
        return time.time()

    node = next(iter(cluster.worker_nodes)).node_id
    here = NodeAffinitySchedulingStrategy(node, soft=False)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        sleeper = ray.remote(Sleeper).options(num_cpus=0, max_concurrency=4, scheduling_strategy=here).remote()
        waiting = ray.remote(waits).options(num_cpus=1, scheduling_strategy=here).remote(sleeper)
        deadline = time.monotonic() + 60
        while not ray.get(sleeper.called.remote()) and time.monotonic() < deadline:
            time.sleep(0.1)  # until the relay waits
        other = ray.remote(starts).options(num_cpus=1, scheduling_strategy=here).remote()
        (relay_started, relay_done), other_started = ray.get([waiting, other], timeout=120)
    finally:
        ray.shutdown()
    assert relay_done - relay_started >= 2.9
    assert other_started >= relay_done - 0.05, "another task ran on the CPU the waiting relay holds"


def test_a_failing_job_names_its_tensor_and_target(family, cluster, tmp_path):
    import dataclasses

    from mbuild.errors import BuildError
    from mbuild.ray_workers import compute_jobs
    from mbuild.storage import SharedDirectory

    job, _ = planned_job(family, tmp_path, "dare", "dare_ties")
    task = job.task
    gone = dataclasses.replace(job, destination=(str(tmp_path / "no-such-shard.safetensors"), 0, task.nbytes))
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(ray.remote(compute_jobs).options(max_retries=0).remote([job, gone], SharedDirectory(tmp_path / "r")))
    finally:
        ray.shutdown()
    cause = raised.value.cause
    assert isinstance(cause, BuildError)
    assert f"tensor '{task.name}' of target 'dare' failed on the Ray cluster: FileNotFoundError" in str(cause)
    assert cause.location is not None and cause.location.target == "dare"


def test_jobs_travel_in_groups_of_bounded_size():
    from types import SimpleNamespace

    from mbuild import ray_executor

    def job(size):
        return SimpleNamespace(task=SimpleNamespace(nbytes=size))

    big, small = ray_executor.GROUP_BYTES, 4096
    jobs = [job(small) for _ in range(40)] + [job(big), job(big // 2), job(big // 2), job(small)]
    groups = ray_executor._groups(jobs)
    assert [j for group in groups for j in group] == jobs  # every job once, in order
    assert [len(g) for g in groups] == [ray_executor.GROUP_JOBS] * 2 + [8 + 1, 2, 1]
    assert all(len(g) <= ray_executor.GROUP_JOBS for g in groups)
    assert ray_executor._groups([]) == []


def test_an_edited_installation_names_new_warm_workers():
    """A warm worker started before mbuild changed is never asked again: its name no longer matches."""
    from mbuild import ray_workers

    path = Path(ray_workers.__file__)
    before = ray_workers._installation.__wrapped__()
    stat = path.stat()
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert ray_workers._installation.__wrapped__() != before
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ray_workers._installation.__wrapped__() == before


def test_a_warm_worker_killed_mid_call_is_replaced_and_the_jobs_computed_again(family, cluster, tmp_path):
    """A relay whose node's warm worker dies under it starts another and gets every result."""
    import dataclasses

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mbuild import keys, ray_workers
    from mbuild.storage import SharedDirectory

    job, _ = planned_job(family, tmp_path, "ties", "ties")
    shard = tmp_path / "shard.safetensors"
    with open(shard, "wb") as file:
        file.truncate(job.task.nbytes)
    job = dataclasses.replace(job, destination=(str(shard), 0, job.task.nbytes))
    jobs = [job] * 400  # a few seconds of work for one warm worker
    node = next(iter(cluster.worker_nodes)).node_id
    here = NodeAffinitySchedulingStrategy(node, soft=False)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        relay = ray.remote(ray_workers.relay_jobs).options(num_cpus=1, max_retries=0, scheduling_strategy=here)
        ray.get(relay.remote(ray.cloudpickle.dumps(jobs[:1]), SharedDirectory(tmp_path / "r"), 600.0))
        victim = ray.get(ray.get_actor(ray_workers.warm_name(node), namespace=ray_workers.NAMESPACE).ready.remote(600.0))
        results = relay.remote(ray.cloudpickle.dumps(jobs), SharedDirectory(tmp_path / "r"), 600.0)
        time.sleep(1.0)
        assert not ray.wait([results], timeout=0)[0], "the jobs were done before the warm worker could be killed"
        os.kill(victim, signal.SIGKILL)
        results = ray.get(results, timeout=300)
        successor = ray.get(ray.get_actor(ray_workers.warm_name(node), namespace=ray_workers.NAMESPACE).ready.remote(600.0))
    finally:
        ray.shutdown()
    assert successor != victim
    assert len(results) == len(jobs) and {r.node for r in results} == {node}
    assert {r.digest for r in results} == {keys.tensor_digest(shard.read_bytes())}
