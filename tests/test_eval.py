"""Eval targets (`mbuild.plan.kinds.evaluation`, `mbuild.evaluation`) and `mbuild report`.

Scores are compared with the same definitions computed directly with transformers on the
same folders; staleness is shown by the stored score's file and the build's report.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import build_json, run_cli

pytest.importorskip("transformers")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A merge is only as good as its evaluation.\n"
    "def add(a, b):\n    return a + b\n"
) * 6


def mergefile(folder: Path, family, body: str, weight: float = 0.5) -> Path:
    """A linear merge 'final' of math and code, and the eval targets ``body`` (indented lines)."""
    text = f"""targets:
  final:
    merge_method: linear
    models:
      - model: {family['math']}
        parameters: {{weight: {weight}}}
      - model: {family['code']}
        parameters: {{weight: 0.5}}
{body}"""
    path = folder / "Mergefile"
    path.write_text(text)
    return path


def report(path: Path) -> dict:
    code, out, err = run_cli("report", "-f", str(path), "--json")
    assert code == 0, err
    return json.loads(out)


def direct_perplexity(folder: Path, text: str, max_tokens: int, window: int, stride: int, dtype) -> float:
    """The windowed perplexity of transformers' guide, through the model's own loss with masked labels."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([tokenizer(text)["input_ids"][:max_tokens]])
    total, count, previous_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + window, ids.shape[1])
            chunk = ids[:, begin:end]
            labels = chunk.clone()
            labels[:, : -(end - previous_end)] = -100
            scored = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=chunk, labels=labels).loss) * scored
            count += scored
            previous_end = end
            if end == ids.shape[1]:
                break
    return math.exp(total / count)


def test_perplexity_equals_a_direct_computation(llama, tmp_path):
    import torch

    (tmp_path / "wiki.txt").write_text(TEXT)
    body = """  ppl:
    eval: {model: final, metric: perplexity, data: wiki.txt, max_tokens: 150, window: 48, stride: 20, dtype: float32}
  ppl-base:
    eval: {model: %s, metric: perplexity, data: wiki.txt, max_tokens: 150, window: 48}
""" % llama["base"]
    path = mergefile(tmp_path, llama, body)
    built = build_json(path)
    assert built["ppl"]["status"] == "built" and built["ppl"]["tensors_computed"] == 1
    scores = report(path)["evals"]
    expected = direct_perplexity(tmp_path / "build" / "final", TEXT, 150, 48, 20, torch.float32)
    assert scores["ppl"]["score"] == pytest.approx(expected, rel=1e-5)
    # Defaults: the stored dtype (bfloat16) and a stride of half the window.
    expected_base = direct_perplexity(llama["base"], TEXT, 150, 48, 24, torch.bfloat16)
    assert scores["ppl-base"]["score"] == pytest.approx(expected_base, rel=1e-3)
    assert scores["ppl"]["score"] != pytest.approx(scores["ppl-base"]["score"], rel=1e-3)


def test_a_second_build_evaluates_nothing(llama, tmp_path):
    (tmp_path / "wiki.txt").write_text(TEXT)
    # The source is new to this cache: it is hashed by the eval's own reads on the first build.
    body = f"""  ppl:
    eval: {{model: {llama['base']}, metric: perplexity, data: wiki.txt, max_tokens: 100, window: 32}}
  ppl-final:
    eval: {{model: final, metric: perplexity, data: wiki.txt, max_tokens: 100, window: 32}}
"""
    path = mergefile(tmp_path, llama, body)
    first = build_json(path)
    assert {first[n]["status"] for n in ("ppl", "ppl-final")} == {"built"}
    scores = [tmp_path / "build" / name / "score.safetensors" for name in ("ppl", "ppl-final")]
    before = [s.stat().st_mtime_ns for s in scores]
    again = build_json(path)
    assert {name: r["status"] for name, r in again.items()} == {"final": "fresh", "ppl": "fresh", "ppl-final": "fresh"}
    assert sum(r["tensors_computed"] for r in again.values()) == 0
    assert [s.stat().st_mtime_ns for s in scores] == before
    data = report(path)["evals"]
    assert data["ppl"]["fresh"] and data["ppl-final"]["fresh"]


def test_a_changed_recipe_or_data_evaluates_again(llama, tmp_path):
    data = tmp_path / "wiki.txt"
    data.write_text(TEXT)
    body = """  ppl:
    eval: {model: final, metric: perplexity, data: wiki.txt, max_tokens: 100, window: 32}
"""
    path = mergefile(tmp_path, llama, body)
    build_json(path)
    first = report(path)["evals"]["ppl"]["score"]

    mergefile(tmp_path, llama, body, weight=0.9)  # the model's recipe changes
    assert not report(path)["evals"]["ppl"]["fresh"]
    changed = build_json(path)
    assert changed["final"]["status"] == "built"
    assert changed["ppl"]["status"] == "built" and changed["ppl"]["tensors_computed"] == 1
    second = report(path)["evals"]["ppl"]["score"]
    assert second != first

    data.write_text(TEXT.replace("fox", "cat"))  # the data changes
    changed = build_json(path)
    assert changed["final"]["status"] == "fresh"
    assert changed["ppl"]["status"] == "built" and changed["ppl"]["tensors_computed"] == 1
    assert report(path)["evals"]["ppl"]["score"] != second

    # The same bytes under another name are the same data: the score is reused, not recomputed.
    data.rename(tmp_path / "renamed.txt")
    path.write_text(path.read_text().replace("wiki.txt", "renamed.txt"))
    moved = build_json(path)
    assert moved["ppl"]["tensors_computed"] == 0 and moved["ppl"]["tensors_reused"] == 1


def direct_choice(model, tokenizer, question: str, choices: list[str]) -> int:
    """The choice whose tokens have the highest summed log-likelihood after the question."""
    import torch

    context = tokenizer(question)["input_ids"]
    scores = []
    for choice in choices:
        continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        scores.append(sum(float(log_probs[len(context) + i - 1, token]) for i, token in enumerate(continuation)))
    return max(range(len(choices)), key=lambda i: scores[i])


def greedy_text(model, tokenizer, prompt: str, tokens: int) -> str:
    """transformers' own greedy decoding of ``tokens`` tokens after the prompt, leading space removed."""
    import torch

    ids = tokenizer(prompt)["input_ids"]
    made = model.generate(
        torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, use_cache=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(made[0, len(ids) :], skip_special_tokens=True).lstrip()


def direct_exact(model, tokenizer, prompt: str, answer: str) -> bool:
    """The answer as a whole word at the start of the greedy continuation (one token a byte, and one)."""
    text = greedy_text(model, tokenizer, prompt, len(answer.encode()) + 1)
    return text.startswith(answer) and (len(text) == len(answer) or not text[len(answer)].isalnum())


def test_accuracy_equals_a_direct_computation(llama, tmp_path):
    import torch
    import transformers

    folder = llama["base"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    questions = [
        ("The quick brown fox", ["jumps over", "return a", "lazy dog", "def add"]),
        ("def add(a, b):", ["return a + b", "the fox", "over the"]),
        ("A merge is only", ["as good", "brown fox"]),
    ]
    items = []
    for index, (question, choices) in enumerate(questions):
        best = direct_choice(model, tokenizer, question, choices)
        # The first two name the model's own choice, the third another one.
        answer = best if index < 2 else (best + 1) % len(choices)
        items.append({"question": question, "choices": choices, "answer": answer})
    # An exact answer the model gives: its greedy text up to the first character that ends a word.
    for prompt in ("return", "The", "A merge is", "x = "):
        text = greedy_text(model, tokenizer, prompt, 16)
        ends = [i for i, c in enumerate(text) if i and not c.isalnum()]
        if ends and ends[0] > 1:
            word = text[: ends[0]]
            break
    else:
        pytest.fail("no prompt makes the tiny model end a word")
    items += [
        {"prompt": prompt, "answer": word},  # right
        {"prompt": prompt, "answer": word[:-1]},  # a prefix of the word: wrong
        {"prompt": prompt, "answer": word + "q"},  # longer than what is made: wrong
    ]
    expected = [direct_choice(model, tokenizer, i["question"], i["choices"]) == i["answer"] for i in items[:3]]
    expected += [direct_exact(model, tokenizer, i["prompt"], i["answer"]) for i in items[3:]]
    assert expected[:4] == [True, True, False, True]
    lines = [json.dumps(item) for item in items]
    (tmp_path / "items.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    body = """  acc:
    eval: {model: %s, metric: accuracy, data: items.jsonl, dtype: float32}
""" % folder
    path = mergefile(tmp_path, llama, body)
    build_json(path, "acc")
    assert report(path)["evals"]["acc"]["score"] == pytest.approx(sum(expected) / len(items))


def error_of(path: Path) -> str:
    code, _, err = run_cli("-f", str(path), "--dry-run")
    assert code == 2, err
    return err


def line_of(path: Path, fragment: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


@pytest.mark.parametrize(
    "body, fragment, message",
    [
        ("model: final|metric: bleu|data: wiki.txt", "metric: bleu", "unknown metric 'bleu'"),
        ("model: final|metric: perplexity|data: missing.txt", "missing.txt", "data file not found"),
        ("model: final|metric: perplexity|data: wiki.txt|max_tokens: -5", "max_tokens", "'max_tokens' must be a whole number of at least 1"),
        ("model: final|metric: accuracy|data: wiki.txt|stride: 4", "stride", "'stride' applies to metric perplexity"),
        ("model: final|metric: perplexity", "eval:", "needs 'data:'"),
        ("model: final|metric: perplexity|data: wiki.txt|colour: red", "colour", "unknown key 'colour'"),
        ("model: final|metric: perplexity|data: wiki.txt|window: 64|stride: 65", "stride", "larger than 'window'"),
    ],
)
def test_a_bad_eval_body_is_one_error_at_its_line(llama, tmp_path, body, fragment, message):
    (tmp_path / "wiki.txt").write_text(TEXT)
    lines = "".join(f"      {line}\n" for line in body.split("|"))
    path = mergefile(tmp_path, llama, f"  ppl:\n    eval:\n{lines}")
    err = error_of(path)
    assert message in err
    assert f"Mergefile:{line_of(path, fragment)}: target 'ppl'" in err


def test_a_bad_accuracy_item_names_its_file_and_line(llama, tmp_path):
    (tmp_path / "items.jsonl").write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a", "b"], "answer": 2}\n'
    )
    path = mergefile(tmp_path, llama, "  acc:\n    eval: {model: final, metric: accuracy, data: items.jsonl}\n")
    err = error_of(path)
    assert "items.jsonl:2: target 'acc'" in err and "'answer' is the index" in err


def test_an_eval_target_is_no_model(llama, tmp_path):
    (tmp_path / "wiki.txt").write_text(TEXT)
    body = """  ppl:
    eval: {model: final, metric: perplexity, data: wiki.txt}
  again:
    merge_method: linear
    models:
      - model: ppl
        parameters: {weight: 1.0}
"""
    path = mergefile(tmp_path, llama, body)
    err = error_of(path)
    assert "'ppl' is an eval target" in err and f"Mergefile:{line_of(path, '- model: ppl')}" in err


def test_lm_eval_without_the_harness_is_a_clear_error(llama, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    path = mergefile(tmp_path, llama, "  harness:\n    eval: {model: final, metric: lm-eval, task: hellaswag, num_fewshot: 5}\n")
    err = error_of(path)
    assert "pip install 'mbuild[eval]'" in err and "target 'harness'" in err


TASK = """task: tiny_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_on_a_task_file_gives_the_harness_score(llama, tmp_path):
    pytest.importorskip("lm_eval")
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    items = [
        {"question": "The quick brown fox", "choices": ["jumps over", "return a"], "answer": 0},
        {"question": "def add(a, b):", "choices": ["return a + b", "the fox"], "answer": 1},
        {"question": "A merge is only", "choices": ["as good", "brown fox", "lazy"], "answer": 2},
        {"question": "return", "choices": ["a + b", "over"], "answer": 0},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(items=tmp_path / "items.jsonl"))
    body = """  harness:
    eval: {model: %s, metric: lm-eval, task: tasks/tiny.yaml, window: 64, dtype: float32}
""" % llama["base"]
    path = mergefile(tmp_path, llama, body)
    assert build_json(path, "harness")["harness"]["status"] == "built"
    stored = report(path)["evals"]["harness"]["score"]
    assert 0 < stored < 1  # neither all right nor all wrong: the score is the task's accuracy

    model = transformers.AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama["base"])
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=64, device="cpu")
    results = simple_evaluate(model=harness, tasks=["tiny_choices"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    assert stored == pytest.approx(results["results"]["tiny_choices"]["acc,none"])
    assert build_json(path, "harness")["harness"]["status"] == "fresh"


def test_a_model_that_cannot_fit_is_refused_before_anything_runs(llama, tmp_path, monkeypatch):
    from mbuild import memory

    (tmp_path / "wiki.txt").write_text(TEXT)
    path = mergefile(tmp_path, llama, "  ppl:\n    eval: {model: final, metric: perplexity, data: wiki.txt}\n")
    monkeypatch.setattr(memory, "available_memory", lambda: 200 * 1000**2)  # a machine of 200 MB
    code, _, err = run_cli("-f", str(path))
    assert code == 2
    assert re.search(r"needs about [\d.]+ GB and 0\.20 GB is available on cpu", err), err
    assert f"Mergefile:{line_of(path, 'eval:')}: target 'ppl'" in err
    assert not (tmp_path / "build" / "final").exists()  # nothing ran, not even the merge


def test_the_dry_run_estimates_an_eval_as_a_model_run(llama, tmp_path):
    # The memory the dry run shows for an eval is the model's, as the check before the build
    # counts it, not that of a task whose output is one number; it reads the whole model.
    (tmp_path / "wiki.txt").write_text(TEXT)
    path = mergefile(tmp_path, llama, "  ppl:\n    eval: {model: final, metric: perplexity, data: wiki.txt, dtype: float32}\n")
    code, out, err = run_cli("-f", str(path), "--dry-run", "--json")
    assert code == 0, err
    rows = json.loads(out)["targets"]
    model_bytes = rows["final"]["parameters"] * 4  # evaluated in float32
    assert rows["ppl"]["bytes_to_read"] == rows["final"]["bytes"]
    assert rows["ppl"]["peak_memory"] > model_bytes and rows["ppl"]["largest_task_memory"] > model_bytes
    assert rows["ppl"]["tensors_to_compute"] == 1


def test_report_json_shape_and_table(llama, tmp_path):
    (tmp_path / "wiki.txt").write_text(TEXT)
    body = """  ppl:
    eval: {model: final, metric: perplexity, data: wiki.txt, max_tokens: 64, window: 32}
  later:
    eval: {model: final, metric: perplexity, data: wiki.txt, max_tokens: 32, window: 32}
"""
    path = mergefile(tmp_path, llama, body)
    build_json(path, "ppl")
    data = report(path)
    assert set(data) == {"evals"}
    assert set(data["evals"]) == {"ppl", "later"}
    row = data["evals"]["ppl"]
    assert row["model"] == "final" and row["metric"] == "perplexity"
    assert isinstance(row["score"], float) and row["score"] > 1.0
    assert data["evals"]["later"]["score"] is None  # never built
    code, out, _ = run_cli("report", "-f", str(path), "ppl")
    assert code == 0 and "ppl" in out and "later" not in out and f"{row['score']:.6g}" in out
    code, _, err = run_cli("report", "-f", str(path), "final")
    assert code == 2 and "not an eval target" in err


def test_sweep_points_make_a_grid():
    from types import SimpleNamespace

    from mbuild.cli.report import sweep_grids

    rows = {}
    for t in ("0.3", "0.5"):
        for density in ("0.4", "0.6", "0.8"):
            rows[f"ppl[t={t},density={density}]"] = {"model": f"final[t={t},density={density}]", "metric": "perplexity",
                                                      "score": float(t) + float(density)}
    rows["other"] = {"model": "base", "metric": "perplexity", "score": 1.0}
    grids = sweep_grids(SimpleNamespace(sweeps={}), rows)
    assert list(grids) == ["ppl"]
    grid = grids["ppl"]
    assert grid["parameters"] == ["t", "density"]
    assert grid["rows"] == ["0.3", "0.5"] and grid["columns"] == ["0.4", "0.6", "0.8"]
    assert grid["scores"]["0.5"]["0.6"] == pytest.approx(1.1)


def test_evals_over_a_sweep_make_a_grid_and_a_heatmap(llama, tmp_path):
    from mbuild import mergefile as mergefile_module

    if not hasattr(mergefile_module.Mergefile, "expand_names"):
        pytest.skip("this tree has no sweeps")
    (tmp_path / "wiki.txt").write_text(TEXT)
    path = tmp_path / "Mergefile"
    path.write_text(f"""targets:
  final:
    merge_method: ties
    base_model: {llama['base']}
    models:
      - model: {llama['math']}
      - model: {llama['code']}
    parameters: {{weight: 0.5, density: 0.5}}
    matrix: {{density: [0.3, 0.9], weight: [0.2, 1.0]}}
  ppl:
    eval: {{model: final, metric: perplexity, data: wiki.txt, max_tokens: 48, window: 32}}
""")
    built = build_json(path)
    assert sum(1 for name in built if name.startswith("ppl[")) == 4
    code, out, err = run_cli("report", "-f", str(path), "--json", "--plot", str(tmp_path / "plots"))
    assert code == 0, err
    data = json.loads(out)
    grid = data["grids"]["ppl"]
    assert grid["parameters"] == ["density", "weight"]
    assert grid["rows"] == ["0.3", "0.9"] and grid["columns"] == ["0.2", "1.0"]
    assert grid["scores"]["0.9"]["0.2"] == data["evals"]["ppl[density=0.9,weight=0.2]"]["score"]
    assert data["evals"]["ppl[density=0.3,weight=1.0]"]["model"] == "final[density=0.3,weight=1.0]"
    assert (tmp_path / "plots" / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
