"""Recipe search (`mbuild search NAME [--apply]`): Optuna's trials as ordinary builds scored by an
eval target, sharing tensors through the cache (counted against the plan), and the best recipe
written back into the Mergefile as a plain target that builds to the best trial's bytes.
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import build_json, grain_family, run_cli
from mbuild import mergefile, search
from mbuild.errors import MergefileError

pytest.importorskip("optuna")
pytest.importorskip("transformers")

LAYER_TENSORS = 9  # of one Llama decoder layer: 4 attention projections, 3 MLP ones, 2 norms


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-family")
    found = grain_family(root, layers=3, hidden=256, intermediate=512, rows=512)
    words = "the quick brown fox jumps over a lazy dog while models merge their tensors".split()
    generator = random.Random(0)
    (root / "wiki.txt").write_text(" ".join(generator.choice(words) for _ in range(400)))
    found["data"] = root / "wiki.txt"
    return found


def searched_mergefile(family, trials=8, sampler="tpe", space="t: {low: 0, high: 1, step: 0.5, anchors: 2}") -> str:
    """SLERP of base and math: layers 0-1 with the searched per-layer t, layer 2 fixed at 0.5."""
    return textwrap.dedent(f"""\
        # a comment the edit keeps
        targets:
          final:
            merge_method: slerp
            base_model: {family['base']}
            slices:
              - sources: [{{model: {family['base']}, layer_range: [0, 2]}}, {{model: {family['math']}, layer_range: [0, 2]}}]
              - sources: [{{model: {family['base']}, layer_range: [2, 3]}}, {{model: {family['math']}, layer_range: [2, 3]}}]
                parameters: {{t: 0.5}}
            parameters: {{t: 0.3}}  # the value written by hand
          ppl:
            eval: {{model: final, metric: perplexity, data: {family['data']}, max_tokens: 200}}

        search:
          final:
            objective: ppl
            sampler: {sampler}
            trials: {trials}
            seed: 0
            space:
              {space}
        """)


def run_search(path: Path, *args: str) -> dict:
    code, out, err = run_cli("search", "-f", str(path), "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_eight_trials_on_per_layer_t_reuse_what_the_plan_shares(family, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(searched_mergefile(family))
    result = run_search(path, "final")
    trials = result["trials"]
    assert len(trials) == 8 and all(t["status"] == "done" for t in trials)
    assert all(len(t["values"]["t"]) == 2 and set(t["values"]["t"]) <= {0.0, 0.5, 1.0} for t in trials)
    total = trials[0]["tensors_computed"]
    assert trials[0]["tensors_reused"] == 0 and total > 3 * LAYER_TENSORS
    # The first trial built and evaluated; its times are there for benchmarks to read.
    assert trials[0]["build_seconds"] > 0 and trials[0]["eval_seconds"] > 0
    for trial in trials[1:]:
        assert trial["tensors_reused"] > 0
        # What the engine took from the cache is exactly what an earlier trial's plan had.
        assert trial["tensors_reused"] == trial["shared"]
        assert trial["tensors_computed"] + trial["tensors_reused"] == total
    # Beyond the fixed layer: with 3 values per anchor, 8 trials must repeat a searched layer's value.
    assert sum(t["tensors_reused"] - LAYER_TENSORS for t in trials[1:]) > 0
    # The score is the objective's, as stored by its eval: the same values score the same.
    by_values = {}
    for trial in trials:
        by_values.setdefault(tuple(trial["values"]["t"]), set()).add(trial["score"])
    assert all(len(scores) == 1 for scores in by_values.values())
    assert len({t["score"] for t in trials}) == len(by_values) > 1
    best = min(trials, key=lambda t: t["score"])
    assert result["best"]["number"] == best["number"]
    # The user's own outputs and lock are untouched: trials build into build/search/final.
    assert not (tmp_path / "build" / "final").exists() and not (tmp_path / "Mergefile.lock").exists()
    assert json.loads((tmp_path / "build" / "search" / "final" / "trials.json").read_text())["best"] == result["best"]


def test_apply_writes_a_target_that_builds_to_the_best_trials_bytes(family, tmp_path):
    path = tmp_path / "Mergefile"
    original = searched_mergefile(family, trials=4)
    path.write_text(original)
    result = run_search(path, "final", "--apply")
    best = result["best"]
    assert result["applied"] == {"target": "final-best", "file": str(path), "in_mergefile": True}
    edited = path.read_text()
    # Only lines were added: every line written before is still there, in order, comments included.
    kept = iter(edited.splitlines())
    assert all(line in kept for line in original.splitlines())
    parsed = mergefile.load(path)
    assert dict(parsed.targets["final-best"].parameters) == {"t": best["values"]["t"]}
    assert dict(parsed.targets["final"].parameters) == {"t": 0.3}
    # Built with a cache of its own, so computed afresh rather than taken from the trials'.
    report = build_json(path, "final-best", "--cache-dir", str(tmp_path / "other-cache"))
    assert report["final-best"]["status"] == "built" and report["final-best"]["tensors_reused"] == 0
    assert search.output_digest(tmp_path / "build" / "final-best") == best["output_digest"]
    others = {t["output_digest"] for t in result["trials"] if t["values"] != best["values"]}
    assert best["output_digest"] not in others
    # A second --apply replaces the block it wrote rather than adding another.
    run_search(path, "final", "--apply")
    assert path.read_text().count("final-best:") == 1
    assert path.read_text().count("# best of") == 1


def test_a_flow_style_mergefile_gets_the_recipe_beside_it(family, tmp_path):
    text = searched_mergefile(family, trials=2)
    data = yaml.safe_load(text)
    path = tmp_path / "Mergefile"
    path.write_text(json.dumps(data))  # JSON is YAML in flow style: no line of the target's own
    result = run_search(path, "final", "--apply")
    assert result["applied"]["in_mergefile"] is False
    assert path.read_text() == json.dumps(data)
    beside = Path(result["applied"]["file"])
    assert beside.name == "Mergefile.final-best.yaml" and "final-best:" in beside.read_text()


def test_cmaes_sampler_runs(family, tmp_path):
    pytest.importorskip("cmaes")
    path = tmp_path / "Mergefile"
    path.write_text(searched_mergefile(family, trials=3, sampler="cmaes"))
    result = run_search(path, "final")
    assert [t["status"] for t in result["trials"]] == ["done"] * 3


BAD = {
    "unknown key": ("space:\n      t: {low: 0, high: 1}\n    budget: 3", "unknown key 'budget'", 22),
    "unknown parameter": ("space:\n      tt: {low: 0, high: 1}", "slerp has no parameter 'tt'", 21),
    "low above high": ("space:\n      t: {low: 1, high: 0}", "must be below", 21),
    "out of range": ("space:\n      t: {low: 0, high: 2}", "bad value for 't'", 21),
    "no space": ("space: {}", "'space' maps parameters", 20),
    "per model on a per-tensor parameter": ("space:\n      t@base: [0.1, 0.2]", "one value per tensor", 21),
    "bad anchors": ("space:\n      t: {low: 0, high: 1, anchors: 0}", "'anchors' is a whole number", 21),
    "step that misses high": ("space:\n      t: {low: 0, high: 1, step: 0.3}", "does not divide high - low", 21),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_search_is_one_error_with_file_and_line(family, tmp_path, name):
    tail, fragment, line = BAD[name]
    text = searched_mergefile(family, space="SPACE").replace("space:\n      SPACE", tail)
    path = tmp_path / "Mergefile"
    path.write_text(text)
    with pytest.raises(MergefileError) as caught:
        search.read_search(mergefile.load(path), "final")
    assert fragment in str(caught.value) and str(caught.value).startswith(f"{path}:{line}: target 'final'")


def test_the_objective_must_be_an_eval_that_reads_the_searched_target(family, tmp_path):
    text = searched_mergefile(family).replace(
        "  ppl:\n", f"  other:\n    merge_method: passthrough\n    models: [{family['code']}]\n  ppl:\n")
    path = tmp_path / "Mergefile"
    for objective, fragment in (("other", "is not an eval target"), ("nothing", "names an eval target")):
        path.write_text(text.replace("objective: ppl", f"objective: {objective}"))
        with pytest.raises(MergefileError, match=fragment):
            search.read_search(mergefile.load(path), "final")
    path.write_text(text.replace("eval: {model: final,", "eval: {model: other,"))
    with pytest.raises(MergefileError, match="does not read 'final'"):
        search.read_search(mergefile.load(path), "final")
    code, _, err = run_cli("search", "-f", str(path), "nothing")
    assert code == 2 and "no search for 'nothing'" in err


def test_mbuild_check_finds_a_bad_search_before_it_is_run(family, tmp_path):
    path = tmp_path / "Mergefile"
    good = searched_mergefile(family)
    path.write_text(good)
    code, out, err = run_cli("check", "-f", str(path), "--json")
    assert code == 0 and json.loads(out)["problems"] == [], err
    path.write_text(good.replace("objective: ppl", "objective: nothing"))
    code, out, _ = run_cli("check", "-f", str(path), "--json")
    problems = json.loads(out)["problems"]
    assert code == 2 and len(problems) == 1 and "names an eval target" in problems[0]
    assert problems[0].startswith(f"{path}:") and "target 'final'" in problems[0]


def test_a_mergefile_changed_during_the_search_is_left_alone(family, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(searched_mergefile(family))
    found = search.read_search(mergefile.load(path), "final")
    changed = path.read_text().replace("# a comment the edit keeps", "# edited meanwhile")
    path.write_text(changed)
    best = search.TrialResult(0, {"t": [0.5, 1.0]}, score=1.5)
    written, in_mergefile = search.apply(found, mergefile.load(path), best)
    assert not in_mergefile and path.read_text() == changed
    beside = yaml.safe_load(written.read_text())
    assert beside["final-best"]["parameters"] == {"t": [0.5, 1.0]} and "output" not in beside["final-best"]
