"""LoRA inputs (``base+adapter``): a PEFT adapter applied to its base model, tensor by tensor.

Such a model is a source of its own: its tensors are the base's, except each one the adapter
changes, ``W + scaling · B·A``, which is computed once into ``<cache>/lora/`` as a one-tensor
safetensors file named by what it is made of (the base tensor's digest, the adapter tensors'
digests, the scaling and the version of the arithmetic below). Everything downstream reads
it like any stored tensor, and its digest keys the tasks that read it: a changed adapter
changes exactly the tensors it touches, an unchanged one is never applied again. Nothing is
written into the user's folders, and only one tensor is held at a time.

The arithmetic is PEFT's ``merge_and_unload()``, which mergekit runs on the base loaded in
its stored dtype: ``B @ A`` in float32, times the scaling (``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``; per module from ``rank_pattern`` and
``alpha_pattern``), added to the weight in float32 and rounded once to the weight's dtype.
An embedding's adapter (``lora_embedding_A/B``) is transposed, and its product is rounded to
the weight's dtype before the addition, as PEFT's embedding layer does. A dry run computes
nothing: a tensor not applied yet leaves its keys unknown.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mbuild import io, keys
from mbuild.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VERSION = 1  # of the arithmetic: part of every applied tensor's name
PREFIX = "base_model.model."  # PEFT's names: the model's own module names under this
# What PEFT keeps of a LoRA layer, by the end of its name: (role, embedding layer).
PARTS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".base_layer.weight": ("W", None),  # the layer's weight saved with the adapter (embedding layers)
}
# Adapter settings that change what merging means; mbuild applies plain LoRA only.
UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
               "velora_config", "monteclora_config", "kasa_config", "mica", "modules_to_save", "trainable_token_indices",
               "layer_replication", "target_parameters")


@dataclass(frozen=True)
class Patch:
    """One base tensor an adapter changes, and how."""

    name: str  # the base tensor
    a: io.TensorInfo
    b: io.TensorInfo
    scaling: float
    embedding: bool  # lora_embedding_A/B: the product is transposed
    transposed: bool  # fan_in_fan_out (GPT-2's Conv1D): the weight is stored (in, out)
    weight: io.TensorInfo | None = None  # the adapter's own copy of the weight, loaded over the base's


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter read from its folder and checked against a base model's tensors."""

    folder: Path
    info: io.ModelInfo  # adapter_model.safetensors's tensor table
    patches: tuple[Patch, ...]


def read_adapter(folder: Path, base: io.ModelInfo) -> Adapter:
    """An adapter folder as PEFT saves it, checked against ``base`` from the headers alone.

    Every mistake is one ModelError: a missing file, a kind of adapter other than plain
    LoRA, a module the base lacks, a shape or rank that does not fit.
    """
    folder = Path(folder)
    try:
        config = io.read_small_json(folder / ADAPTER_CONFIG)
    except FileNotFoundError:
        raise ModelError(f"the adapter {folder} has no {ADAPTER_CONFIG} (a folder PEFT's save_pretrained wrote)") from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"the adapter {folder} is a {config.get('peft_type')} adapter; only LoRA adapters can be applied")
    for setting in UNSUPPORTED:
        if config.get(setting) not in (None, False, [], {}, ""):
            raise ModelError(f"the adapter {folder} sets '{setting}': only plain LoRA adapters can be applied")
    initialization = config.get("init_lora_weights", True)
    if initialization not in (True, False, "gaussian"):
        # PiSSA, OLoRA, CorDA, LoftQ...: PEFT changes the base weights too as it loads them.
        raise ModelError(f"the adapter {folder} sets init_lora_weights: {initialization!r}, which changes the base model too")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"the adapter {folder} has no {ADAPTER_WEIGHTS}")
    info = io.model_from_files(folder, config, [weights])
    modules: dict[str, dict[str, io.TensorInfo]] = {}
    embedding: dict[str, bool] = {}
    for name, tensor in info.tensors.items():
        part = next((p for p in PARTS if name.endswith(p)), None)
        if not name.startswith(PREFIX) or part is None:
            raise ModelError(f"the adapter {folder} holds '{name}', which is not part of a LoRA layer")
        module = name[len(PREFIX) : -len(part)]
        role, is_embedding = PARTS[part]
        modules.setdefault(module, {})[role] = tensor
        if is_embedding is not None:
            embedding[module] = is_embedding
    patches = tuple(
        _patch(folder, config, base, module, parts, embedding.get(module)) for module, parts in sorted(modules.items())
    )
    if not patches:
        raise ModelError(f"the adapter {folder} changes no tensor")
    return Adapter(folder, info, patches)


def _patch(folder: Path, config: Mapping[str, Any], base: io.ModelInfo, module: str, parts, is_embedding) -> Patch:
    """One module's LoRA pair checked against the base tensor it changes."""
    name = f"{module}.weight"
    if "A" not in parts or "B" not in parts:
        raise ModelError(f"the adapter {folder} has no pair of lora_A and lora_B for {module}")
    target = base.tensors.get(name)
    if target is None:
        raise ModelError(f"the adapter {folder} changes {module}, but the base model has no tensor {name}")
    a, b = parts["A"], parts["B"]
    transposed = bool(config.get("fan_in_fan_out")) and not is_embedding
    if len(target.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2:
        raise ModelError(f"the adapter {folder}: {module} is not a matrix (base {list(target.shape)})")
    rank = a.shape[0]
    rows, columns = b.shape[0], a.shape[1]
    product = (columns, rows) if is_embedding or transposed else (rows, columns)
    if b.shape[1] != rank or product != tuple(target.shape):
        raise ModelError(
            f"the adapter {folder} does not fit {name}: A {list(a.shape)} and B {list(b.shape)} "
            f"make {list(product)}, the base tensor is {list(target.shape)}"
        )
    for tensor in (a, b):
        if tensor.dtype not in io.FLOAT_DTYPES:
            raise ModelError(f"the adapter {folder}: {tensor.name} has dtype {tensor.dtype}, not a float")
    if target.dtype not in io.FLOAT_DTYPES:
        raise ModelError(f"the adapter {folder} changes {name}, whose dtype {target.dtype} is not a float")
    weight = parts.get("W")
    if weight is not None and tuple(weight.shape) != tuple(target.shape):
        raise ModelError(f"the adapter {folder} saves {name} as {list(weight.shape)}, the base has {list(target.shape)}")
    expected = _by_pattern(config.get("rank_pattern") or {}, module, config.get("r", 8))
    if expected != rank:
        raise ModelError(f"the adapter {folder}: {module} has rank {rank}, its config says {expected}")
    alpha = _by_pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ModelError(f"the adapter {folder}: lora_alpha {alpha!r} is not a number")
    # PEFT's own expressions, so the float is the same one.
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Patch(name, a, b, scaling, bool(is_embedding), transposed, weight)


def _by_pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module value: the first pattern that the module name ends in, after a dot or whole."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class Adapters:
    """Where adapted tensors are kept: ``folder`` (the cache's ``lora/``).

    ``write``: whether this command may hash sources and compute adapted tensors (a build) or
    only look (a dry run, status). ``step(description, total_bytes)``: a context that yields a
    function told of progress, for the long steps (hashing a base, applying an adapter).
    """

    def __init__(self, folder: Path, state, write: bool, step=None):
        self.folder = Path(folder)
        self.state = state
        self.write = write
        self.step = step or _quiet_step

    def applied(self, base: io.ModelInfo, adapter: Adapter, label: str = "") -> io.ModelInfo:
        """The base model with the adapter applied: its tensors, the adapted ones in the cache.

        ``label``: how the user wrote the model, for progress.
        """
        base_digests = self._digests(base, f"{label or base.folder} (its base)")
        adapter_digests = self._digests(adapter.info, f"{label or adapter.folder} (its adapter)")
        tensors = dict(base.tensors)
        files: dict[str, Path] = {}  # base tensor -> the file of its adapted bytes
        missing: list[Patch] = []  # to be applied now
        for patch in adapter.patches:
            target = base.tensors[patch.name]
            file = None
            if base_digests is not None and adapter_digests is not None:
                file = self.folder / f"{_applied_name(patch, target, base_digests, adapter_digests)}.safetensors"
            if file is not None and not file.is_file() and self.write:
                missing.append(patch)
            elif file is None or not file.is_file():
                # Not applied, and not to be now: a file that is not there leaves the keys unknown.
                file = self.folder / "not-applied-yet" / keys.text_name(f"{adapter.folder}\0{patch.name}")
                tensors[patch.name] = io.TensorInfo(patch.name, target.dtype, target.shape, str(file), 0, target.nbytes)
            files[patch.name] = file
        if missing:
            with self.step(f"applying {label or adapter.folder}", sum(base.tensors[p.name].nbytes for p in missing)) as advance:
                for patch in missing:
                    digest = _apply(patch, base.tensors[patch.name], files[patch.name])
                    # Hashed as written: the source's digests are then known without a read.
                    file = files[patch.name]
                    self.state.remember(str(file), io.file_identity(file), {patch.name: digest})
                    advance(base.tensors[patch.name].nbytes)
        for name, file in files.items():
            if file.is_file():
                tensors[name] = io.model_from_files(self.folder, {}, [file]).tensors[name]
        # The base's files first: the state finds their digests whole, then the adapted tensors' over them.
        return io.ModelInfo(base.folder, base.config, tensors, tuple(base.weight_files) + tuple(map(str, files.values())))

    def _digests(self, model: io.ModelInfo, label: str):
        """A model's remembered digests, hashed now (with progress) when allowed; None when unknown."""
        if self.state is None:
            return None
        found = self.state.digests(model, compute=False)
        if found is None and self.write:
            with self.step(f"hashing {label}", model.nbytes) as advance:
                found = self.state.digests(model, compute=True, progress=advance)
        return found


@contextlib.contextmanager
def _quiet_step(description: str, total: int):
    yield lambda count: None


def _applied_name(patch: Patch, target: io.TensorInfo, base_digests, adapter_digests) -> str:
    """The file name of an adapted tensor: a digest of everything its bytes depend on."""

    def key(info: io.TensorInfo, digests) -> str:
        return keys.content_key(digests[info.name], info.dtype, info.shape)

    weight = key(patch.weight, adapter_digests) if patch.weight is not None else key(target, base_digests)
    material = {
        "lora": VERSION,
        "name": patch.name,
        "weight": weight,
        "dtype": target.dtype,
        "a": key(patch.a, adapter_digests),
        "b": key(patch.b, adapter_digests),
        "scaling": repr(patch.scaling),
        "embedding": patch.embedding,
        "transposed": patch.transposed,
    }
    return keys.digest(material)[:40]


def apply(patch: Patch, weight, a, b):
    """``weight + scaling · B·A`` in PEFT's arithmetic (see the module's notes), in the weight's dtype."""
    import torch

    dtype = weight.dtype
    delta = b.to(torch.float32) @ a.to(torch.float32)
    if patch.embedding or patch.transposed:
        delta = delta.T
    delta = delta * patch.scaling
    if patch.embedding:
        delta = delta.to(dtype)  # PEFT's embedding layer rounds the product first
    return (weight.to(torch.float32) + delta.to(torch.float32)).to(dtype)


def _apply(patch: Patch, target: io.TensorInfo, file: Path) -> str:
    """Compute one adapted tensor into ``file``, whole or not at all; returns its bytes' digest."""
    import torch
    from safetensors.torch import save_file

    reader = io.TensorReader()
    before = torch.get_num_threads()
    # One thread: B·A's rounding then follows no split (the engine computes the same way).
    torch.set_num_threads(1)
    try:
        weight = reader.read(patch.weight) if patch.weight is not None else reader.read(target)
        weight = weight.to(io.torch_dtype(target.dtype))
        result = apply(patch, weight, reader.read(patch.a), reader.read(patch.b))
        del weight
    finally:
        torch.set_num_threads(before)
        reader.close()
    if not torch.isfinite(result).all():
        raise ModelError(f"applying the adapter to {patch.name} gives non-finite values (NaN or inf)")
    result = result.contiguous()
    digest = keys.tensor_digest(io.raw_bytes(result))
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        save_file({patch.name: result}, str(temporary), metadata={"format": "pt"})
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, file)
        io.fsync_folder(file.parent)
    finally:
        if temporary.exists():
            temporary.unlink()
    return digest


def remove_unused(folder: Path, models: list[io.ModelInfo]) -> int:
    """Remove the adapted tensors under ``folder`` that none of ``models`` reads (`mbuild gc`); returns how many."""
    in_use = {file for model in models for file in model.weight_files}
    removed = 0
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        if str(file) not in in_use:
            file.unlink(missing_ok=True)
            removed += 1
    return removed
