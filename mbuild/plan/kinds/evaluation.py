"""The eval kind: one model (a source or a target) scored on a metric, the score kept like a tensor.

An `eval: {model: final, metric: perplexity, data: wiki.txt, max_tokens: 20000}` target
expands into one task (the ``eval`` operation, run by `mbuild.evaluation`) whose output is the
score, a float64 tensor of one element written to ``score.safetensors`` in the target's
folder. Its inputs are every tensor of the model, so its key is made of the model's tensor
keys (the target's, or the source's digests), the model's config and tokenizer files, the
eval's settings, the data file's digest, the transformers release and the compute platform:
an unchanged model is never evaluated twice, and the score is cached and reused as any tensor
is. The data file's path is not in the key (a moved file with the same bytes is the same data).

Settings are resolved here, so the key names what runs: ``window`` (tokens per forward pass,
default the model's context at most 1024), ``stride`` (default half the window) and ``dtype``
(default the model's stored dtype). An accuracy file is checked item by item now, each
mistake at its line, before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from mbuild import io, keys
from mbuild.errors import Location, MergefileError
from mbuild.mergefile import Target
from mbuild.mergefile.evaluation import describe, model_name
from mbuild.plan.companions import TOKENIZER_FILE, companions_of, file_digest, finish_target_plan
from mbuild.plan.kinds.registry import TargetKind, register
from mbuild.plan.tasks import OutputLookup, TargetPlan, TensorInput, TensorTask, input_key, node_of

EVAL_VERSION = 1
REFERENCE = "transformers AutoModelForCausalLM; perplexity as in its guide 'Perplexity of fixed-length models'"
SCORE = "score"  # the one tensor of an eval target's output
SCORE_FILE = "score.safetensors"
DEFAULT_WINDOW = 1024


def expand(
    target: Target,
    infos: Mapping[str, io.ModelInfo],
    plans: Mapping[str, TargetPlan],
    source_digests,
    shard_bytes: int,
    output_digest: OutputLookup,
    store: Path,
    *,
    platform: str,
) -> TargetPlan:
    """Expand an eval target into its one scoring task, over every tensor of the model."""
    spec = target.evaluation
    node = node_of(spec.model)
    info = infos[node]
    runner = _runner(target)
    params = settings(target, info)
    params["runner"] = runner
    params["model_files"] = _model_files_digest(target, node, infos, plans)
    if spec.data is not None:
        params["data"] = file_digest(str(spec.data))
        if params["data"] is None:
            raise MergefileError(f"cannot read data file {spec.data}", target.location("eval", "data"))
        if spec.metric == "accuracy":
            read_items(spec.data, target.name)  # every mistake found now, at its line
    task_path = None
    if spec.task and Path(spec.task).is_absolute():  # a task file: its name inside, its digest in the key
        task_path = spec.task
        params["task"], params["task_file"] = task_file(target, Path(spec.task))
    inputs = tuple(
        TensorInput(node, name, input_key(node, tensor, plans, source_digests, output_digest))
        for name, tensor in sorted(info.tensors.items())
    )
    dtype = params["dtype"]
    key = None
    if all(i.key is not None for i in inputs):
        key = keys.task_key(
            method="eval", version=EVAL_VERSION, params=params, model_params=[], base_index=None,
            compute_dtype=dtype, out_dtype="float64", shape=(1,), seed=None,
            input_keys=[i.key for i in inputs], platform=platform,
        )
    unkeyed = {"path": str(spec.data) if spec.data else None, "task_path": task_path}  # read, not keyed
    task = TensorTask(SCORE, (1,), "float64", dtype, "eval", tuple(sorted({**params, **unkeyed}.items())), (), None, None, inputs, key)
    config = {"mbuild_eval": {"model": model_name(spec.model), "metric": spec.metric, **{k: v for k, v in params.items() if v is not None}}}
    plan = finish_target_plan(target, method_of(target), [task], config, {}, None, shard_bytes, card=model_card(target, params))
    return dataclasses.replace(plan, output_format="eval")


def settings(target: Target, info: io.ModelInfo) -> dict[str, Any]:
    """The eval's settings with every default resolved from the model (what the key names)."""
    spec = target.evaluation
    context = io.config_int(info.config, ("max_position_embeddings", "n_positions", "max_sequence_length"))
    window = spec.window or min(context or DEFAULT_WINDOW, DEFAULT_WINDOW)
    if context and window > context:
        raise MergefileError(
            f"'window' is {window} tokens but model '{spec.model}' reads at most {context}", target.location("eval", "window")
        )
    stride = None
    if spec.metric == "perplexity":
        stride = spec.stride or max(1, window // 2)
        if stride > window:
            raise MergefileError(f"'stride' ({stride}) is larger than the window ({window})", target.location("eval", "stride"))
    return {
        "metric": spec.metric,
        "max_tokens": spec.max_tokens,
        "window": window,
        "stride": stride,
        "dtype": spec.dtype or stored_dtype(info),
        "task": spec.task,
        "num_fewshot": spec.num_fewshot,
        "limit": spec.limit,
    }


def stored_dtype(info: io.ModelInfo) -> str:
    """The float dtype most of a model's tensors are stored in (float32 when none is)."""
    counts: dict[str, int] = {}
    for tensor in info.tensors.values():
        if tensor.dtype in io.FLOAT_DTYPES:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


def _runner(target: Target) -> str:
    """What computes the score, by release (part of the key); a clear error when it is not installed."""
    where = target.location("eval", "metric")
    if importlib.util.find_spec("transformers") is None:
        raise MergefileError("an eval target runs the model with transformers: pip install 'mbuild[eval]'", where)
    runner = f"transformers-{_release('transformers')}"
    if target.evaluation.metric == "lm-eval":
        if importlib.util.find_spec("lm_eval") is None:
            raise MergefileError("metric lm-eval needs lm-evaluation-harness: pip install 'mbuild[eval]'", where)
        runner += f"+lm-eval-{_release('lm_eval')}"
    return runner


def _release(package: str) -> str:
    from importlib import metadata  # here: a plan without eval targets does not pay for its import

    try:
        return ".".join(metadata.version(package).split(".")[:2])
    except metadata.PackageNotFoundError:
        return "unknown"


def _model_files_digest(target: Target, node: str, infos, plans) -> str:
    """The digest of what the model is besides its tensors: its config and tokenizer files."""
    files = {n: p for n, p in companions_of(node, infos, plans).items() if TOKENIZER_FILE.match(n) or n == "tokenizer_config.json"}
    if not any(n.startswith("tokenizer") for n in files):
        raise MergefileError(
            f"model '{target.evaluation.model}' has no tokenizer files to read the data with", target.location("eval", "model")
        )
    return keys.digest({"config": dict(infos[node].config), "files": {n: file_digest(p) for n, p in sorted(files.items())}})


def task_file(target: Target, path: Path) -> tuple[str, str]:
    """The task name an lm-eval task file declares (its `task:`), and the file's digest."""
    where = target.location("eval", "task")
    try:
        declared = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise MergefileError(f"cannot read task file {path}: {error}", where) from None
    name = declared.get("task") if isinstance(declared, dict) else None
    if not isinstance(name, str) or not name:
        raise MergefileError(f"task file {path} names no 'task:'", where)
    return name, file_digest(str(path))


def read_items(path: Path, target_name: str | None = None) -> list[dict[str, Any]]:
    """The items of an accuracy file: one JSON object a line, multiple-choice or exact-answer.

    Multiple-choice: ``{"question": str, "choices": [str, ...], "answer": index}``;
    exact-answer: ``{"prompt": str, "answer": str}``. Blank lines are skipped; any other
    mistake is one error naming the file and line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MergefileError(f"cannot read {path}: {error}", Location(Path(path), None, target_name)) from None
    return parse_items(text, path, target_name)


def parse_items(text: str, path: Path, target_name: str | None = None) -> list[dict[str, Any]]:
    """The items of an accuracy file's text (see `read_items`); ``path`` names it in errors."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = Location(Path(path), number, target_name)
        try:
            item = json.loads(line)
        except ValueError as error:
            raise MergefileError(f"not a JSON object: {error}", where) from None
        problem = _item_problem(item)
        if problem:
            raise MergefileError(problem, where)
        items.append(item)
    if not items:
        raise MergefileError("no items: an accuracy file holds one JSON object a line", Location(Path(path), None, target_name))
    return items


def _item_problem(item: Any) -> str | None:
    """What is wrong with one accuracy item, or None."""
    if not isinstance(item, dict):
        return "an item is a JSON object"
    if "choices" in item:
        choices, answer = item.get("choices"), item.get("answer")
        if set(item) - {"question", "choices", "answer", "id"} or not isinstance(item.get("question"), str):
            return 'a multiple-choice item is {"question": str, "choices": [str, ...], "answer": index}'
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            return "'choices' is a list of at least two non-empty strings"
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            return f"'answer' is the index of the right choice (0 to {len(choices) - 1}), not {answer!r}"
        return None
    if set(item) - {"prompt", "answer", "id"} or not isinstance(item.get("prompt"), str):
        return 'an item is {"question", "choices", "answer": index} or {"prompt": str, "answer": str}'
    if not isinstance(item.get("answer"), str) or not item["answer"].strip():
        return "an exact-answer item's 'answer' is a non-empty string"
    return None


def model_card(target: Target, params: Mapping[str, Any]) -> str:
    """The README.md beside the score: what was scored, how, and the recipe."""
    spec = target.evaluation
    recipe = yaml.safe_dump({target.name: dict(target.recipe)}, sort_keys=False).rstrip()
    shown = ", ".join(f"{k} {v}" for k, v in params.items() if v is not None and k not in ("metric", "model_files", "data"))
    return (
        "---\ntags:\n- mbuild\n- eval\n---\n"
        f"# {target.name}\n\n"
        f"The {describe(spec)} of `{model_name(spec.model)}` ({spec.model.kind}), computed by mbuild ({shown}). "
        f"The score is the one tensor of `{SCORE_FILE}`; `mbuild report` prints it.\n\n"
        f"## Recipe\n\n```yaml\n{recipe}\n```\n"
    )


def method_of(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, reference) of what an eval target runs."""
    return "eval", EVAL_VERSION, REFERENCE


EVALUATION = register(TargetKind("eval", matches=lambda target: target.evaluation is not None, method=method_of, expand=expand))
