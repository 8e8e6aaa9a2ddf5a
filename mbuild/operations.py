"""The operations tensor tasks name, in one table, and what runs them.

A task's ``method`` is a merge method of `mbuild.methods`, or one of the operations that
only move or route bytes: ``copy`` (an integer buffer taken from the first input),
``concat`` (experts stacked into one tensor, written in pieces because it can be huge) and
``moe_gate`` (a router computed from prompts). The engine looks every one up here
(`operation`) and knows none of them by name.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mbuild import io, keys, memory, methods
from mbuild.errors import BuildError
from mbuild.methods import NonFiniteResult
from mbuild.plan import TensorTask


@dataclass
class Inputs:
    """What a task reads from, for one target: its input models, a reader and where to compute."""

    models: Mapping[str, io.ModelInfo]
    reader: io.TensorReader
    device: Any
    target: Any  # the mergefile Target, for locations in error messages
    vocabulary: Any = None
    threads: int = 1  # cores the task may split its work between without changing a byte
    gates: Any = None  # moe.GateContext, when the target has routers
    base_folder: Any = None  # the MoE base model's folder, for its tokenizer


@dataclass(frozen=True)
class Operation:
    """How a task of one kind runs.

    ``compute(task, inputs)`` returns the output tensor; an operation that ``streams`` has
    ``stream(task, inputs, writer)`` write its bytes into the shard itself and return their
    digest (its results are too large to hold or cache whole).
    """

    name: str
    compute: Callable[[TensorTask, Inputs], Any] | None = None
    stream: Callable[[TensorTask, Inputs, io.ShardedWriter], str] | None = None

    @property
    def streams(self) -> bool:
        return self.stream is not None


def _method(task: TensorTask, inputs: Inputs):
    return compute_task(
        task, inputs.models, inputs.reader, inputs.device, inputs.target, inputs.vocabulary, inputs.threads
    )


def _gate(task: TensorTask, inputs: Inputs):
    from mbuild import moe

    router = moe.compute_gate(task, inputs.models, inputs.reader, inputs.gates, inputs.base_folder)
    return router.to(io.torch_dtype(task.dtype))


def _concat(task: TensorTask, inputs: Inputs, writer: io.ShardedWriter) -> str:
    from mbuild import moe

    return moe.stream_concat(task, inputs.models, inputs.reader, writer)


def _gguf(task: TensorTask, inputs: Inputs):
    """One tensor of a GGUF target: read, laid out and encoded as llama.cpp wants it (`io.gguf_file`)."""
    import torch

    from mbuild.io import gguf_file

    item = task.inputs[0]
    info = inputs.models[item.node].tensors.get(item.name)
    if info is None:
        raise BuildError(f"input '{item.node.split(':', 1)[1]}' has no tensor '{item.name}'")
    try:
        return torch.from_numpy(gguf_file.encode(inputs.reader.read(info), **dict(task.params)))
    except ValueError as error:  # a value f16 cannot hold, or a row no type's blocks fit
        raise BuildError(f"tensor '{task.name}': {error}", inputs.target.location()) from None


def _lora_extract(task: TensorTask, inputs: Inputs):
    """One factor of an extracted LoRA adapter (`mbuild.plan.kinds.lora_extraction`)."""
    from mbuild.plan.kinds import lora_extraction

    tensors = []
    for item in task.inputs:
        info = inputs.models[item.node].tensors.get(item.name)
        if info is None:
            raise BuildError(f"input '{item.node.split(':', 1)[1]}' has no tensor '{item.name}'")
        tensors.append(inputs.reader.read(info))
    return lora_extraction.factor(tensors[0], tensors[1], **dict(task.params))


def _eval(task: TensorTask, inputs: Inputs):
    """The score of an eval target's model (`mbuild.evaluation`)."""
    from mbuild import evaluation

    return evaluation.score(task, inputs)


# The operations that are not merge methods; every other name is looked up in mbuild.methods.
OPERATIONS = {
    "copy": Operation("copy", compute=_method),
    "concat": Operation("concat", stream=_concat),
    "moe_gate": Operation("moe_gate", compute=_gate),
    "gguf": Operation("gguf", compute=_gguf),
    "lora_extract": Operation("lora_extract", compute=_lora_extract),
    "eval": Operation("eval", compute=_eval),
}
METHOD = Operation("method", compute=_method)


def operation(name: str) -> Operation:
    """The operation a task's ``method`` names."""
    return OPERATIONS.get(name, METHOD)


def portable(task: TensorTask) -> bool:
    """Whether a task is worth running on another machine, from its inputs' paths alone.

    Streamed operations write into the output's shard, and routers read the base model's
    tokenizer and run it: those run where the output is assembled. So do copies (a buffer, an
    unscaled passthrough): they only move bytes, which the driver would move again.
    """
    if operation(task.method).compute is not _method or task.method == "copy":
        return False
    copies = task.method == "passthrough" and not any(dict(p).get("scale") is not None for p in task.model_params)
    return not copies


def compute_task(
    task: TensorTask,
    models: Mapping[str, io.ModelInfo],
    reader: io.TensorReader,
    device,
    target,
    vocabulary=None,
    threads: int = 1,
):
    """Read a task's inputs, run its method in the compute dtype, and cast to the output dtype.

    ``threads``: how many threads the task may split its work between where the split does
    not change the bytes (slices of an element-wise method, a threaded kernel's own parts).
    """
    import torch

    tensors = []
    for item in task.inputs:
        info = models[item.node].tensors.get(item.name)
        if info is None:
            raise BuildError(f"input '{item.node.split(':', 1)[1]}' has no tensor '{item.name}'")
        tensors.append(reader.read(info))
    if task.method == "copy":
        return tensors[0]
    if task.fuse is not None:
        tensors = fuse_experts(tensors, *task.fuse)
    compute_dtype = io.torch_dtype(task.compute_dtype)
    method = methods.get(task.method)
    options = {
        "base_index": task.base_index,
        "params": dict(task.params),
        "model_params": [dict(p) for p in task.model_params],
    }
    same_shape = all(t.shape == tensors[0].shape for t in tensors)
    if method.elementwise and same_shape and not task.vocabulary and torch.device(device).type == "cpu":
        return _compute_in_slices(task, method, tensors, compute_dtype, options, target, threads)
    if method.threaded:
        options["threads"] = threads if torch.device(device).type == "cpu" else 1
    if method.stored_inputs:
        options["dtype"] = compute_dtype
    # Aligning vocabularies works on whole tensors in the compute dtype.
    convert = not method.stored_inputs or task.vocabulary
    dtype = compute_dtype if convert else None
    if torch.device(device).type == "cuda":
        # Pinned inputs copied on the worker thread's own stream: with -j N, one task's copies
        # overlap another's kernels and the next reads. The result returns by a synchronous copy.
        with torch.cuda.stream(_gpu_stream(device)):
            inputs = [t.pin_memory().to(device=device, non_blocking=True).to(dtype=dtype) for t in tensors]
            del tensors
            return _run_kernel(task, method, inputs, options, target, vocabulary)
    inputs = [t.to(device=device, dtype=dtype) for t in tensors]
    del tensors
    return _run_kernel(task, method, inputs, options, target, vocabulary)


def _run_kernel(task: TensorTask, method, inputs, options, target, vocabulary):
    """A method's kernel over inputs on their device and in the compute dtype; the result on the CPU."""
    import torch

    if task.vocabulary:
        from mbuild import vocabulary as vocabularies

        inputs = vocabularies.align(inputs, [i.node for i in task.inputs], vocabulary)
    generator = None
    if task.seed is not None:
        # Drawn on the CPU whatever the device, so the bytes do not depend on it.
        generator = torch.Generator("cpu").manual_seed(keys.tensor_seed(task.seed, task.name))
    if method.casts_output:
        options["out_dtype"] = io.torch_dtype(task.dtype)
    try:
        result = method.kernel(inputs, generator=generator, **options)
        if not method.casts_output:  # one that casts checked its values as it went
            methods.require_finite(result)
    except NonFiniteResult:
        raise _non_finite(task, target) from None
    del inputs
    return result.to(dtype=io.torch_dtype(task.dtype)).cpu()


_streams = threading.local()


def _gpu_stream(device):
    """This worker thread's CUDA stream."""
    import torch

    stream = getattr(_streams, "stream", None)
    if stream is None:
        stream = _streams.stream = torch.cuda.Stream(device=device)
    return stream


def fuse_experts(tensors, experts: int, parts: int):
    """Each model's per-expert tensors as one: parts concatenated per expert, experts stacked.

    ``tensors`` is model-major (each model's experts in order, each expert's parts in order);
    the result has one tensor per model, laid out as transformers 5 fuses them on loading and
    as mergekit merges them.
    """
    import torch

    per_model = experts * parts
    fused = []
    for start in range(0, len(tensors), per_model):
        mine = tensors[start : start + per_model]
        stacked = [torch.cat(mine[e * parts : (e + 1) * parts], dim=0) if parts > 1 else mine[e * parts] for e in range(experts)]
        fused.append(torch.stack(stacked, dim=0))
    return fused


ELEMENTWISE_SLICE = memory.ELEMENTWISE_SLICE


def _compute_in_slices(task: TensorTask, method, tensors, compute_dtype, options, target, threads: int = 1):
    """An element-wise method run a slice at a time, each written into the output as it is done.

    Only a slice of each input is ever converted to the compute dtype, so memory is the
    inputs as stored plus the output; per element the operations, and so the bytes, are
    those of the whole-tensor run, whichever of ``threads`` threads runs a slice. A method's
    compiled one-pass form, where it applies, does the same in one pass.
    """
    import torch

    output = torch.empty(tensors[0].shape, dtype=io.torch_dtype(task.dtype))
    try:
        if method.one_pass is not None and method.one_pass(
            [t.contiguous() for t in tensors], output, compute_dtype=compute_dtype, threads=threads, **options
        ):
            return output
        flat_output = output.view(-1)
        flat_inputs = [t.reshape(-1) for t in tensors]

        def run_slice(start: int) -> None:
            stop = start + ELEMENTWISE_SLICE
            result = method.kernel([t[start:stop].to(compute_dtype) for t in flat_inputs], generator=None, **options)
            methods.require_finite(result)
            flat_output[start:stop] = result

        methods.map_in_threads(run_slice, range(0, flat_output.numel(), ELEMENTWISE_SLICE), threads)
    except NonFiniteResult:
        raise _non_finite(task, target) from None
    return output


def _non_finite(task: TensorTask, target) -> BuildError:
    """A clear error for NaN or inf in a method's result (they would poison every later merge)."""
    return BuildError(f"tensor '{task.name}' has non-finite values (NaN or inf) after {task.method}", target.location())


def copy_streamed(reader: io.TensorReader, info: io.TensorInfo, writer: io.ShardedWriter, name: str) -> str:
    """Copy one stored tensor's bytes in chunks into the writer's slot; returns their digest."""
    digest = keys.tensor_hasher()
    offset = 0
    for chunk in reader.chunks(info):
        writer.write_part(name, offset, chunk)
        digest.update(chunk)
        offset += len(chunk)
    return writer.finish(name, digest.hexdigest())
