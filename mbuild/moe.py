"""Running the operations of mixture-of-experts targets (torch, imported inside functions).

The MoE kind (`mbuild.plan.kinds.moe`) plans an MoE without torch; what its tasks name is
run here: fused expert tensors are streamed one expert at a time straight into the output,
never held whole (`stream_concat`); router rows are computed once per target from the
experts' prompts, as mergekit-moe does, and cached per layer like any tensor (`compute_gate`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from mbuild import io, keys


@dataclass
class GateContext:
    """What computing router rows needs beyond the task: the device, a memo and its lock."""

    device: Any
    memo: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        # transformers resolves its names lazily, which is not thread-safe: do it here,
        # on the thread that builds, before worker threads need them.
        import transformers

        transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # noqa: B018


def compute_gate(task, models: Mapping[str, io.ModelInfo], reader: io.TensorReader, context: GateContext, base_folder):
    """One layer's router rows [experts, hidden] from the experts' prompts (some of them with `rows`).

    Float32 from embeddings or random; from hidden states they stay in the model's bfloat16
    through the difference and the norm, as mergekit-moe computes them.
    """
    params = dict(task.params)
    mode, layer, layers, prompts = params["mode"], params["layer"], params["layers"], params["prompts"]
    experts = len(prompts)
    hidden = task.shape[1]
    memo_key = (mode, keys.digest([params["prompts"], [i.key for i in task.inputs], task.seed, layers, hidden]))
    with context.lock:  # every layer's task needs the same vectors: compute them once
        rows = _vectors(context, memo_key, mode, prompts, task, models, reader, layers, experts, hidden, base_folder)[layer]
    if "rows" in params:  # the experts' or the shared expert's part of rows computed together
        start, stop = params["rows"]
        rows = rows[start:stop]
    return rows


def _vectors(context, memo_key, mode, prompts, task, models, reader, layers, experts, hidden, base_folder):
    import torch

    vectors = context.memo.get(memo_key)
    if vectors is None:
        if mode == "random":
            generator = torch.Generator("cpu").manual_seed(task.seed)
            vectors = torch.randn((layers, experts, hidden), generator=generator)
        elif mode == "uniform_random":
            generator = torch.Generator("cpu").manual_seed(task.seed)
            scale = (1.0 / hidden) ** 0.5
            vectors = torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
        else:
            vectors = _prompt_vectors(mode, prompts, task, models, reader, layers, base_folder, context.device)
        context.memo[memo_key] = vectors
    return vectors


def _prompt_vectors(mode, prompts, task, models, reader, layers, base_folder, device):
    """mergekit-moe's gate vectors: per expert, positive minus negative prompt features, unit norm."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_folder)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(texts):
        return tokenizer([(tokenizer.bos_token or "") + text for text in texts], return_tensors="pt",
                         padding=True, add_special_tokens=False)

    if mode == "cheap_embed":
        item = task.inputs[0]
        embed = reader.read(models[item.node].tensors[item.name])
        vocab = embed.shape[0]

        def features(batch):
            onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=vocab)
            h = onehot.float() @ embed.float()
            summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16).to(device)
        model.eval()

        def features(batch):
            with torch.no_grad():
                output = model(**batch.to(device), output_hidden_states=True, return_dict=True)
            states = torch.stack(output.hidden_states[:-1])
            states = states.sum(dim=2) / states.shape[2] if mode == "hidden_avg" else states[:, :, -1, :]
            return (states.sum(dim=1) / states.shape[1]).cpu()  # bfloat16, as mergekit-moe keeps it

    rows = []
    for positive, negative in prompts:
        vector = features(tokenize(positive))
        if negative:
            vector = vector - features(tokenize(negative))
        vector = vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(vector)
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def stream_concat(task, models: Mapping[str, io.ModelInfo], reader: io.TensorReader, writer: io.ShardedWriter) -> str:
    """Write a stacked tensor input by input (one expert at a time); returns its digest."""
    import torch

    digest = keys.tensor_hasher()
    offset = 0
    scales = dict(task.params)["scales"]
    out_dtype = io.torch_dtype(task.dtype)
    for item, scale in zip(task.inputs, scales):
        tensor = reader.read(models[item.node].tensors[item.name])
        if scale is not None:
            tensor = tensor.float() * scale
        data = io.raw_bytes(tensor.to(out_dtype))
        if scale is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"non-finite values in {task.name}")
        writer.write_part(task.name, offset, data)
        digest.update(data)
        offset += len(data)
        del tensor, data
    return writer.finish(task.name, digest.hexdigest())
