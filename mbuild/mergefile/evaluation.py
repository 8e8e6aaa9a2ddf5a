"""The checks of an `eval:` target's body (README: "Eval targets"), each mistake at its line.

An eval target scores one model: `eval: {model: final, metric: perplexity, data: wiki.txt,
max_tokens: 20000}`. Kept apart from `checker` so the rules of this one kind of body are read
in one place; `checker.Checker.target` hands a body with `eval:` here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mbuild.mergefile.recipe import Evaluation, Target
from mbuild.mergefile.references import ReferenceResolver
from mbuild.mergefile.values import DTYPE_NAMES, suggest

EVAL_TARGET_KEYS = ("eval", "output", "description")
EVAL_KEYS = ("model", "metric", "data", "max_tokens", "window", "stride", "dtype", "task", "num_fewshot", "limit")
# perplexity: a text file; accuracy: a JSONL of items; lm-eval: a task of lm-evaluation-harness.
METRICS = ("perplexity", "accuracy", "lm-eval")
# The keys that belong to one metric only.
METRIC_ONLY = {
    "max_tokens": ("perplexity",),
    "stride": ("perplexity",),
    "task": ("lm-eval",),
    "num_fewshot": ("lm-eval",),
    "limit": ("lm-eval",),
}
# The settings that are whole numbers, and the least each may be.
COUNTS = {"max_tokens": 1, "window": 1, "stride": 1, "num_fewshot": 0, "limit": 1}
EVAL_DTYPES = ("float32", "bfloat16", "float16")
# A `task:` ending so is a task file of lm-evaluation-harness (its YAML), not a task name.
TASK_FILES = (".yaml", ".yml")


def eval_target(checker, name: str, body: dict, target_names) -> Target:
    """An eval target: `eval: {model, metric, data | task, ...}` checked into a Target."""
    path = ("targets", name)
    where = path + ("eval",)
    spec = checker.kind_body(name, body, "eval", EVAL_TARGET_KEYS, EVAL_KEYS, ("model", "metric"),
                             "'model:', 'metric:' and 'data:' (or 'task:')")
    metric = spec["metric"]
    if metric not in METRICS:
        raise checker.error(where + ("metric",), f"unknown metric {metric!r}{suggest(str(metric), METRICS)}: one of {', '.join(METRICS)}")
    for key, metrics in METRIC_ONLY.items():
        if key in spec and metric not in metrics:
            raise checker.error(where + (key,), f"'{key}' applies to metric {' or '.join(metrics)}, not {metric}")
    model = ReferenceResolver(checker, target_names).resolve(spec["model"], where + ("model",))
    if model.lora is not None:
        raise checker.error(
            where + ("model",), f"'{model}': an eval scores a model folder; make the adapted model a target first"
        )
    numbers = {key: _count(checker, spec, key, where, least) for key, least in COUNTS.items()}
    if numbers["window"] is not None and numbers["stride"] is not None and numbers["stride"] > numbers["window"]:
        raise checker.error(
            where + ("stride",), f"'stride' ({numbers['stride']}) is larger than 'window' ({numbers['window']}): tokens would go unscored"
        )
    dtype = spec.get("dtype")
    if dtype is not None:
        dtype = DTYPE_NAMES.get(str(dtype))
        if dtype not in EVAL_DTYPES:
            raise checker.error(where + ("dtype",), f"unknown dtype {spec['dtype']!r}: one of {', '.join(EVAL_DTYPES)}")
    data, task = None, None
    if metric == "lm-eval":
        if "data" in spec:
            raise checker.error(where + ("data",), "metric lm-eval takes its data from the task; 'data' is for perplexity and accuracy")
        task = spec.get("task")
        if not isinstance(task, str) or not task.strip():
            raise checker.error(
                where + ("task" if "task" in spec else ()), "metric lm-eval needs 'task:', an lm-evaluation-harness task name or file"
            )
        if task.endswith(TASK_FILES):  # a task of one's own, written as lm-eval's YAML
            file = Path(os.path.normpath(checker.mergefile.folder / Path(task).expanduser()))
            if not file.is_file():
                raise checker.error(where + ("task",), f"task file not found: {file}")
            task = str(file)
    else:
        data = _data_file(checker, spec, where)
    output = body.get("output", f"build/{name}")
    if not isinstance(output, str):
        raise checker.error(path + ("output",), "'output' must be a folder path")
    evaluation = Evaluation(model, metric, data, dtype=dtype, task=task, **numbers)
    target = Target(
        name=name, method="eval", models=(), slices=(), base_model=None, parameters={}, dtype=None, out_dtype=None,
        tokenizer_source=None, chat_template=None, output=(checker.mergefile.folder / output).expanduser().absolute(),
        seed=0, recipe=dict(body), mergefile=checker.mergefile, evaluation=evaluation,
    )
    checker.target_name = None
    return target


def _count(checker, spec: dict, key: str, where: tuple, least: int) -> int | None:
    """A whole-number setting of at least ``least``, or None when not written."""
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise checker.error(where + (key,), f"'{key}' must be a whole number of at least {least}, not {value!r}")
    return value


def _data_file(checker, spec: dict, where: tuple) -> Path:
    """The data file, relative to the Mergefile's folder; it must exist now (its digest is in the key)."""
    raw = spec.get("data")
    if not isinstance(raw, str) or not raw.strip():
        raise checker.error(where + ("data" if "data" in spec else ()), f"metric {spec['metric']} needs 'data:', a file path")
    path = Path(os.path.normpath(checker.mergefile.folder / Path(raw).expanduser()))
    if not path.is_file():
        raise checker.error(where + ("data",), f"data file not found: {path}")
    return path


def describe(spec: Any) -> str:
    """One line naming what an eval scores: "perplexity on wiki.txt" or "lm-eval hellaswag (5-shot)"."""
    if spec.metric == "lm-eval":
        shots = f" ({spec.num_fewshot}-shot)" if spec.num_fewshot is not None else ""
        return f"lm-eval {Path(spec.task).name if Path(spec.task).is_absolute() else spec.task}{shots}"
    return f"{spec.metric} on {spec.data.name}"


def model_name(ref: Any) -> str:
    """The model an eval scores, by name: a target by its own (a sweep's point, `final[t=0.3]`), else as written."""
    return ref.location if ref.kind == "target" else ref.text
