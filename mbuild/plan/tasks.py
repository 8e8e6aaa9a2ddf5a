"""The plan's data: sources, tensor tasks and their inputs, expanded targets, the whole plan.

Every kind of target expands into these same frozen values, so the engine, the staleness
rules and the build records read one shape whatever the kind. `input_key` is here too: every
kind keys a task's inputs the same way, by their bytes' digest or else by the upstream task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping

from mbuild import io, keys
from mbuild.mergefile import Mergefile, ModelRef, Target
from mbuild.nodes import Node

DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Source:
    """A checkpoint the family reads: a local folder or a resolved hub snapshot."""

    node: str
    ref: ModelRef
    info: io.ModelInfo
    revision: str | None = None


@dataclass(frozen=True)
class TensorInput:
    """One input of a tensor task: a tensor of a source or of an earlier target."""

    node: str
    name: str
    key: str | None


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: an operation with its resolved parameters over input tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    compute_dtype: str
    method: str  # a registered method, or "copy" for non-float buffers
    params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[tuple[str, Any], ...], ...]
    base_index: int | None
    seed: int | None
    inputs: tuple[TensorInput, ...]
    key: str | None
    vocabulary: bool = False  # inputs are re-indexed into the target's output vocabulary first
    # (experts, parts) when each model gives experts × parts inputs (model-major, then expert,
    # then part), fused before the method runs: per expert its parts concatenated on the first
    # axis, the experts stacked on a new first axis (transformers 5's `gate_up_proj` layout).
    fuse: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return io.TensorInfo(self.name, self.dtype, self.shape, None).nbytes

    @property
    def inputs_per_model(self) -> int:
        """How many inputs each model gives: its expert tensors when fused, else one."""
        return self.fuse[0] * self.fuse[1] if self.fuse else 1

    @property
    def pending(self) -> bool:
        """Whether the key depends on upstream bytes that are not computed yet."""
        return any(i.key is not None and keys.is_pending(i.key) for i in self.inputs)


@dataclass(frozen=True)
class TargetPlan:
    """A target expanded: every output tensor, the config, copied files, card and key."""

    target: Target
    tasks: tuple[TensorTask, ...]
    config: Mapping[str, Any]
    files: Mapping[str, str]  # output file name -> the original file it is copied from
    file_digests: Mapping[str, str | None]
    card: str
    key: str | None
    input_nodes: tuple[str, ...]
    num_layers: int | None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    vocabulary: Any = None  # mbuild.vocabulary.Vocabulary when inputs are aligned by token
    dropped: tuple[str, ...] = ()  # input tensors no output takes ("model: tensor"), allowed by the target
    output_format: str = "safetensors"  # or "gguf": one .gguf file (`mbuild.io.gguf_file`), config as its metadata

    @property
    def name(self) -> str:
        return self.target.name

    @cached_property
    def _tasks_by_name(self) -> dict[str, TensorTask]:
        return {t.name: t for t in self.tasks}

    def task(self, name: str) -> TensorTask | None:
        """The task producing output tensor ``name``."""
        return self._tasks_by_name.get(name)

    @property
    def pending(self) -> bool:
        """Whether the key waits on upstream bytes not computed yet."""
        return any(t.pending for t in self.tasks)

    @property
    def nbytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)

    def model_info(self) -> io.ModelInfo:
        """What downstream planning sees of this target before it is built."""
        tensors = {t.name: io.TensorInfo(t.name, t.dtype, t.shape, None) for t in self.tasks}
        return io.ModelInfo(folder=None, config=self.config, tensors=tensors)


@dataclass
class Plan:
    """The targets to consider in build order, their expansions and the sources they read."""

    mergefile: Mergefile
    order: tuple[str, ...]
    targets: dict[str, TargetPlan]
    sources: dict[str, Source]
    graph: Any = field(repr=False)
    unhashed: frozenset[str] = frozenset()  # source nodes whose bytes are not yet hashed
    platform: str = ""  # where tasks compute: part of every computing task's key


def node_of(ref: ModelRef) -> str:
    """The graph node a model reference points at."""
    return ref.node


# What a plan is told by its caller: a source's tensor digests, and the digest a task key produced.
DigestLookup = Callable[[Source], "Mapping[str, str] | None"]
OutputLookup = Callable[[str], "str | None"]


def input_key(node: str, info: io.TensorInfo, plans: Mapping[str, TargetPlan], source_digests, output_digest) -> str | None:
    """An input's key: its bytes' digest when known, else the upstream task that makes it."""
    name = info.name
    if Node(node).is_target:
        upstream = plans[Node(node).label].task(name)
        if upstream is None or upstream.key is None:
            return None
        made = output_digest(upstream.key)
        if made is None:
            return keys.pending_key(upstream.key)
        return keys.content_key(made, upstream.dtype, upstream.shape)
    found = source_digests.get(node)
    if found is None or name not in found:
        return None
    return keys.content_key(found[name], info.dtype, info.shape)
