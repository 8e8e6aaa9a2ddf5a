"""The LoRA extraction kind: `model - base` factored into a PEFT adapter of a given rank.

An `extract_lora: {model: tuned, base: base, rank: 16}` target takes every 2-D projection of
the decoder layers (q/k/v/o and gate/up/down) that both models hold with the same shape, and
writes the difference ``tuned - base`` (float32) as its best rank-``rank`` approximation, a
truncated SVD ``U S Vh``: ``lora_B = U[:, :r] * S[:r]`` and ``lora_A = Vh[:r]``, so that
``lora_B @ lora_A`` is the truncated delta and PEFT's scaling (``lora_alpha / r``) is 1.
`modules:` and `exclude:` (regexes on names like ``model.layers.0.mlp.up_proj``) narrow the
projections taken. Where ``rank`` exceeds a matrix's smaller side, the factors are padded with zero rows and
columns (PEFT's ``r`` is one number for every module), which leaves the product exact.

Each factor is its own task (``lora_extract`` operation), keyed by its two input tensors and
the rank, so a change of rank recomputes only the factors; A and B of one module each run the
same deterministic CPU SVD. The factors are stored in float32 whatever the models' dtype: a
small delta's factors lose most of their precision in bf16. The folder is PEFT's:
``adapter_model.safetensors`` (names as PEFT saves them, ``base_model.model.<module>.lora_A.weight``),
``adapter_config.json``, the base's ``config.json`` and the model card.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Mapping

import yaml

from mbuild import io, keys
from mbuild.errors import MergefileError
from mbuild.mergefile import Target
from mbuild.plan.companions import finish_target_plan
from mbuild.plan.kinds.registry import TargetKind, register
from mbuild.plan.tasks import OutputLookup, TargetPlan, TensorInput, TensorTask, input_key, node_of

LORA_VERSION = 1
REFERENCE = "https://huggingface.co/docs/peft/developer_guides/lora (adapter format); truncated SVD of the weight delta"
# The decoder layers' linear projections an adapter covers (embeddings, heads and norms are left out).
MODULE = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
ADAPTER_FILE = "adapter_model.safetensors"
# One shard whatever the size: PEFT reads adapter_model.safetensors alone.
ONE_SHARD = 1 << 62


def _order(name: str):
    """Layer by layer in number order, then by name."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return (int(match[1]) if match else -1, name)


def _chosen(module: str, spec) -> bool:
    """Whether the Mergefile's `modules` (any, when given) and `exclude` (none) patterns keep a projection."""
    if spec.modules and not any(re.search(p, module) for p in spec.modules):
        return False
    return not any(re.search(p, module) for p in spec.exclude)


def target_modules(modules: list[str], candidates: list[str]) -> list[str]:
    """PEFT's `target_modules`: a short name ("q_proj") where every layer's is covered, else full paths.

    PEFT adds a LoRA layer to each module a name matches; one the file has no tensors for
    would be reported missing, so a projection left out in some layer is named layer by layer.
    """
    covered = set(modules)
    names: set[str] = set()
    for short in sorted({m.rsplit(".", 1)[1] for m in modules}):
        every = [m for m in candidates if m.rsplit(".", 1)[1] == short]
        if all(m in covered for m in every):
            names.add(short)
        else:
            names.update(m for m in modules if m.rsplit(".", 1)[1] == short)
    return sorted(names)


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
    """Expand an extraction target into two factor tasks (lora_A, lora_B) per projection."""
    spec = target.extract_lora
    tuned_node, base_node = node_of(spec.model), node_of(spec.base)
    tuned, base = infos[tuned_node], infos[base_node]
    rank = spec.rank
    tasks: list[TensorTask] = []
    modules: list[str] = []
    for name in sorted(tuned.tensors, key=_order):
        if not MODULE.search(name) or not _chosen(name[: -len(".weight")], spec):
            continue
        tensor = tuned.tensors[name]
        other = base.tensors.get(name)
        if other is None:
            raise MergefileError(
                f"base '{spec.base}' has no tensor '{name}' that model '{spec.model}' has", target.location("extract_lora", "base")
            )
        if len(tensor.shape) != 2 or tuple(other.shape) != tuple(tensor.shape):
            raise MergefileError(
                f"tensor '{name}' is {list(tensor.shape)} in '{spec.model}' but {list(other.shape)} in '{spec.base}'",
                target.location("extract_lora"),
            )
        if tensor.dtype not in io.FLOAT_DTYPES or other.dtype not in io.FLOAT_DTYPES:
            raise MergefileError(f"tensor '{name}' is not a float tensor", target.location("extract_lora"))
        module = name[: -len(".weight")]
        modules.append(module)
        inputs = (
            TensorInput(tuned_node, name, input_key(tuned_node, tensor, plans, source_digests, output_digest)),
            TensorInput(base_node, name, input_key(base_node, other, plans, source_digests, output_digest)),
        )
        rows, cols = tensor.shape
        for factor, shape in (("A", (rank, cols)), ("B", (rows, rank))):
            params = (("factor", factor), ("rank", rank))
            key = None
            if all(i.key is not None for i in inputs):
                key = keys.task_key(
                    method="lora_extract", version=LORA_VERSION, params=dict(params), model_params=[], base_index=None,
                    compute_dtype="float32", out_dtype="float32", shape=shape, seed=None,
                    input_keys=[i.key for i in inputs], platform=platform,
                )
            out_name = f"base_model.model.{module}.lora_{factor}.weight"
            tasks.append(TensorTask(out_name, shape, "float32", "float32", "lora_extract", params, (), None, None, inputs, key))
    if not tasks:
        raise MergefileError(
            f"model '{spec.model}' has no decoder-layer projections (q/k/v/o/gate/up/down_proj) to extract"
            + (" that 'modules' and 'exclude' choose" if spec.modules or spec.exclude else ""),
            target.location("extract_lora", "model"),
        )
    candidates = [n[: -len(".weight")] for n in tuned.tensors if MODULE.search(n)]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(spec.base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": target_modules(modules, candidates),
        "inference_mode": True,
    }
    text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    files = {"adapter_config.json": str(io.store_text(Path(store) / "adapters", text, ".json"))}
    config = dict(base.config)
    layers = io.layer_count(config) or 0
    plan = finish_target_plan(target, method_of(target), tasks, config, files, layers, ONE_SHARD, card=model_card(target))
    return dataclasses.replace(plan, output_format="peft")


def factor(tuned, base, *, factor: str, rank: int):
    """lora_A (``factor`` "A") or lora_B ("B") of ``tuned - base`` at ``rank``, in float32 on the CPU.

    LAPACK's SVD on the CPU gives the same bytes on every run (the engine runs tasks with torch
    single-threaded), so the A and B tasks of one module agree on the signs of U and Vh.
    """
    import torch

    delta = tuned.to(device="cpu", dtype=torch.float32) - base.to(device="cpu", dtype=torch.float32)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, s.shape[0])
    rows, cols = delta.shape
    if factor == "A":
        out = torch.zeros((rank, cols), dtype=torch.float32)
        out[:kept] = vh[:kept]
    else:
        out = torch.zeros((rows, rank), dtype=torch.float32)
        out[:, :kept] = u[:, :kept] * s[:kept]
    return out.contiguous()


def model_card(target: Target) -> str:
    """The README.md beside the adapter: what it is, from what, and the recipe."""
    spec = target.extract_lora
    recipe = yaml.safe_dump({target.name: dict(target.recipe)}, sort_keys=False).rstrip()
    return (
        "---\nlibrary_name: peft\ntags:\n- mbuild\n- lora\n---\n"
        f"# {target.name}\n\n"
        f"A rank-{spec.rank} LoRA adapter for `{spec.base}`: the difference `{spec.model}` - `{spec.base}` of each "
        "decoder projection, truncated by SVD (lora_B = U·S, lora_A = Vh, scaling 1), written by mbuild.\n\n"
        f"## Recipe\n\n```yaml\n{recipe}\n```\n"
    )


def method_of(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, reference) of what an extraction target runs."""
    return "extract_lora", LORA_VERSION, REFERENCE


LORA_EXTRACTION = register(
    TargetKind("extract_lora", matches=lambda target: target.extract_lora is not None, method=method_of, expand=expand)
)
