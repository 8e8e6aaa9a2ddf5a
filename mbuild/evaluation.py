"""Running an eval target's model and reading its score back (README: "Eval targets").

The plan (`mbuild.plan.kinds.evaluation`) makes one ``eval`` task per eval target; this module
is what the task runs: the model loaded with transformers' `AutoModelForCausalLM.from_pretrained`
from its folder (a source's, or the target's built output) on the build's ``--device``, in the
eval's dtype, then one of three metrics. Batches are one sequence, and no sequence is longer
than the window, so memory is the model plus one window's activations (`memory_needed`); a
model that cannot fit is refused before anything runs (`refuse_unfitting`).

Definitions (the tests compute the same numbers directly with transformers):

- **perplexity**: the file's text encoded by the model's tokenizer (with the BOS it adds),
  its first ``max_tokens`` tokens kept. Windows of ``window`` tokens start every ``stride``
  tokens; each scores the tokens no earlier window scored, except its own first token (which
  has no context inside it), so every token after the first is scored once with at least
  ``window - stride`` tokens of context. The score is exp(mean negative log-likelihood) over
  the scored tokens, the log-softmax taken in float32.
- **accuracy** on a JSONL file (`plan.kinds.evaluation.read_items`): a multiple-choice item
  is right when its answer's choice has the highest summed log-likelihood as the continuation
  ``" " + choice`` of the question (the question encoded with the BOS, the continuation
  without); an exact-answer item is right when the greedy continuation of the prompt (EOS
  ends it), its leading white space removed, starts with the answer (stripped) followed by
  the end, white space or punctuation: "4" is right for "4." or "4 apples", not for "42".
  Sequences longer than the window lose their first tokens. The score is the fraction right.
- **lm-eval**: lm-evaluation-harness's `simple_evaluate` on the loaded model for ``task``
  (``num_fewshot``, ``limit``); the score is the task's ``acc`` (else its first other metric).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mbuild import io, keys, memory
from mbuild.errors import BuildError, ModelError
from mbuild.mergefile.evaluation import model_name
from mbuild.nodes import Node
from mbuild.plan.kinds.evaluation import SCORE, SCORE_FILE, parse_items

# Bytes transformers and the tokenizer add to the process once imported (measured about 400 MB).
RUNNER_BASELINE = 500 * 1000**2


def memory_needed(info: io.ModelInfo, params: Mapping[str, Any]) -> int:
    """Bytes an eval of this model needs: its parameters in the eval's dtype, one window's activations
    (the logits in float32 three times over: logits, their float32 copy and the log-softmax; one
    layer's hidden states and attention scores) and the process around them."""
    size = io.DTYPE_SIZES[params["dtype"]]
    count = sum(t.nbytes // io.DTYPE_SIZES[t.dtype] for t in info.tensors.values())
    window = int(params["window"])
    config = info.config
    vocab = io.config_int(config, ("vocab_size",)) or 0
    hidden = io.config_int(config, ("hidden_size", "n_embd", "d_model")) or 0
    intermediate = io.config_int(config, ("intermediate_size", "n_inner")) or 4 * hidden
    heads = io.config_int(config, ("num_attention_heads", "n_head")) or 1
    activations = window * vocab * 4 * 3 + window * (4 * hidden + 2 * intermediate) * 4 + heads * window * window * 4
    return count * size + activations + memory.BASELINE + RUNNER_BASELINE


def room_on(device: str) -> int:
    """The memory an eval may fill on ``device``: the GPU's free memory, else what this machine has."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free) + memory.BASELINE + RUNNER_BASELINE  # the process's own bytes are on the host
    return memory.available_memory()


def refuse_unfitting(plan, names, device: str) -> None:
    """One error, before anything runs, for the first eval among ``names`` whose model cannot fit."""
    for name in names:
        target_plan = plan.targets.get(name)
        if target_plan is None or target_plan.target.evaluation is None:
            continue
        check_fits(target_plan.target, evaluated_model(plan, target_plan), dict(target_plan.tasks[0].params), device)


def evaluated_model(plan, target_plan) -> io.ModelInfo:
    """The tensor table of the model an eval target scores (a source's, or an earlier target's)."""
    node = target_plan.tasks[0].inputs[0].node
    return plan.sources[node].info if node in plan.sources else plan.targets[Node(node).label].model_info()


def estimate_work(plan, target_plan) -> dict[str, int]:
    """`staleness.estimate_work`'s figures for an eval target: the model read whole, and the
    memory `check_fits` asks for (the tensor-task estimate knows nothing of a model run)."""
    info = evaluated_model(plan, target_plan)
    needs = memory_needed(info, dict(target_plan.tasks[0].params))
    return {
        "tensors_to_compute": 1,
        "bytes_to_read": sum(t.nbytes for t in info.tensors.values()),
        "peak_memory": needs,
        "largest_task_memory": needs - memory.BASELINE,
    }


def check_fits(target, info: io.ModelInfo, params: Mapping[str, Any], device: str) -> None:
    """Refuse an eval whose model, in its dtype, with one window of activations, exceeds the room."""
    needs, room = memory_needed(info, params), room_on(device)
    if needs > room:
        raise BuildError(
            f"evaluating '{model_name(target.evaluation.model)}' in {params['dtype']} with a window of {params['window']} tokens "
            f"needs about {needs / 1e9:.2f} GB and {room / 1e9:.2f} GB is available on {device}: "
            "choose 'dtype: bfloat16', a smaller 'window', or a larger machine",
            target.location("eval"),
        )


def score(task, inputs) -> Any:
    """The ``eval`` operation: the model's score on the task's metric, as a float64 tensor of one element."""
    import torch

    params = dict(task.params)
    target = inputs.target
    node = task.inputs[0].node
    info = inputs.models[node]
    check_fits(target, info, params, str(inputs.device))
    model, tokenizer = load(info.folder, params["dtype"], inputs.device, target)
    with torch.no_grad():
        if params["metric"] == "perplexity":
            text = read_data(Path(params["path"]), params["data"], target)
            ids = tokenizer(text)["input_ids"][: params["max_tokens"] or None]
            if len(ids) < 2:
                raise BuildError(f"the data is {len(ids)} token(s): perplexity needs at least 2", target.location("eval", "data"))
            value = perplexity(model, ids, params["window"], params["stride"], inputs.device)
        elif params["metric"] == "accuracy":
            items = parse_items(read_data(Path(params["path"]), params["data"], target), Path(params["path"]), target.name)
            value = accuracy(model, tokenizer, items, params["window"], inputs.device)
        else:
            value = lm_eval_score(model, tokenizer, params, inputs.device, target)
    return torch.tensor([value], dtype=torch.float64)


def load(folder, dtype: str, device, target):
    """The model (eval mode, on ``device``, in ``dtype``) and its tokenizer, from a model folder."""
    import transformers

    if folder is None:
        raise ModelError(f"model '{target.evaluation.model}' has no folder to load", target.location("eval", "model"))
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # the build draws its own progress
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=io.torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"transformers cannot load {folder}: {error}", target.location("eval", "model")) from None
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def read_data(path: Path, digest: str, target) -> str:
    """The data file's text, refused unless its bytes are those the key was made with."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BuildError(f"cannot read data file {path}: {error}", target.location("eval", "data")) from None
    hasher = keys.file_hasher()
    hasher.update(data)
    if hasher.hexdigest() != digest:
        raise BuildError(f"data file {path} changed while this build ran; run mbuild again", target.location("eval", "data"))
    return text


def token_log_likelihoods(model, ids, device):
    """log p(ids[i] | ids[:i]) for i >= 1, in float32, from one forward pass over ``ids``."""
    import torch

    batch = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = model(input_ids=batch, use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, batch[0, 1:, None])[:, 0].cpu()


def perplexity(model, ids, window: int, stride: int, device) -> float:
    """exp of the mean negative log-likelihood of ``ids``, window by window (see the module's text)."""
    import math

    total, count, scored_to = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        log_likelihoods = token_log_likelihoods(model, ids[begin:end], device)
        new = min(end - scored_to, len(log_likelihoods))
        total -= float(log_likelihoods[len(log_likelihoods) - new :].double().sum())
        count += new
        scored_to = end
        if end == len(ids):
            break
    return math.exp(total / count)


def accuracy(model, tokenizer, items, window: int, device) -> float:
    """The fraction of ``items`` the model gets right (see the module's text)."""
    right = 0
    for item in items:
        if "choices" in item:
            right += choose(model, tokenizer, item, window, device) == item["answer"]
        else:
            right += answer_matches(model, tokenizer, item, window, device)
    return right / len(items)


def choose(model, tokenizer, item, window: int, device) -> int:
    """The index of the choice with the highest summed log-likelihood after the question."""
    context = tokenizer(item["question"])["input_ids"]
    best, best_score = 0, None
    for index, choice in enumerate(item["choices"]):
        continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = (context + continuation)[-window:]
        scored = min(len(continuation), len(ids) - 1)
        value = float(token_log_likelihoods(model, ids, device)[len(ids) - 1 - scored :].double().sum())
        if best_score is None or value > best_score:
            best, best_score = index, value
    return best


def answer_matches(model, tokenizer, item, window: int, device) -> bool:
    """Whether the greedy continuation of the prompt starts with the answer as a whole word.

    At most one token per byte of the answer, and one more, is generated (every token but a
    special one decodes to at least a byte); it stops at EOS, or once the text shows what
    follows the answer.
    """
    import torch

    answer = item["answer"].strip()
    ids = list(tokenizer(item["prompt"])["input_ids"])
    made: list[int] = []
    text = ""
    for _ in range(len(answer.encode("utf-8")) + 1):
        batch = torch.tensor([ids[-window:]], dtype=torch.long, device=device)
        following = int(model(input_ids=batch, use_cache=False).logits[0, -1].argmax())
        if following == tokenizer.eos_token_id:
            break
        made.append(following)
        ids.append(following)
        text = tokenizer.decode(made, skip_special_tokens=True).lstrip()
        if len(text) > len(answer) and text[len(answer)] != "\ufffd":  # a whole character follows
            break
    return starts_with_word(text, answer)


def starts_with_word(text: str, answer: str) -> bool:
    """Whether ``text`` begins with ``answer`` followed by its end, white space or punctuation."""
    if not text.startswith(answer):
        return False
    return len(text) == len(answer) or not text[len(answer)].isalnum()


def lm_eval_score(model, tokenizer, params, device, target) -> float:
    """An lm-evaluation-harness task's score on the loaded model."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise BuildError("metric lm-eval needs lm-evaluation-harness: pip install 'mbuild[eval]'", target.location("eval")) from None
    from lm_eval.tasks import TaskManager

    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=params["window"], device=str(device))
    # A task file of one's own is found in its folder, beside lm-eval's own tasks.
    tasks = TaskManager(include_path=str(Path(params["task_path"]).parent)) if params.get("task_path") else None
    try:
        results = simple_evaluate(
            model=harness, tasks=[params["task"]], num_fewshot=params["num_fewshot"], limit=params["limit"],
            task_manager=tasks, verbosity="ERROR",
        )
    except Exception as error:  # the harness fails in many ways (unknown task, no network for its data)
        raise BuildError(f"lm-eval could not run task '{params['task']}': {error}", target.location("eval", "task")) from None
    found = (results or {}).get("results", {}).get(params["task"], {})
    # Its metrics are named "metric,filter" ("acc,none"), beside their standard errors.
    numbers = {k: v for k, v in found.items() if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    if not numbers:
        raise BuildError(f"lm-eval gave no score for task '{params['task']}'", target.location("eval", "task"))
    return float(numbers.get("acc,none", next(iter(numbers.values()))))


def read_score(target) -> dict[str, Any] | None:
    """An eval target's stored score: {"score", "computed" (a time), "key"}; None if never built."""
    folder = Path(target.output)
    manifest = io.read_manifest(folder)
    if not manifest or not (folder / SCORE_FILE).is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(folder / SCORE_FILE), "np") as stored:
            value = float(stored.get_tensor(SCORE)[0])
    except (OSError, KeyError, ValueError, IndexError):
        return None
    computed = (folder / io.MANIFEST_NAME).stat().st_mtime
    tensor = manifest.get("tensors", {}).get(SCORE, {})
    return {"score": value, "computed": computed, "key": tensor.get("key")}

