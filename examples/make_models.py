"""Generate small but real Hugging Face checkpoints for the example family and the tests.

No weights can be downloaded here, so the example Mergefile runs on models this
script makes: a base model of a real architecture (Llama, Mistral or Qwen2) built
with transformers' ``from_config``, a byte-level BPE tokenizer trained on a few
sentences, and "fine-tunes" that are the base plus small seeded perturbations.

    python examples/make_models.py [FOLDER] [--size tiny|bench]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXT = [
    "Merging models combines the weights of fine-tuned checkpoints without training.",
    "A frankenmerge stacks layers; SLERP interpolates; TIES resolves sign conflicts.",
    "def add(a, b):\n    return a + b\n",
    "The integral of x squared is x cubed over three, plus a constant.",
    "mbuild brings a family of merged models up to date, like make does for programs.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SIZES = {
    # ~2 MB per model: fast enough for every test.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2),
    # ~0.4 GB per model in bfloat16: the benchmark's size.
    "bench": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8
    ),
    # The same layers, 4 and 32 of them: for measuring how time scales with model size.
    "small": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8
    ),
    "large": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=8
    ),
}


def make_tokenizer(folder: Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on the sentences above and save it in HF form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXT * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    return wrapped


def make_model(
    folder: Path,
    architecture: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.02,
    dtype: str = "bfloat16",
    tie_embeddings: bool | None = None,
    num_hidden_layers: int | None = None,
    vocab_size: int | None = None,
    overrides: dict | None = None,
    added_tokens: list[str] | None = None,
    embedding_rows: int | None = None,
) -> Path:
    """Save one checkpoint; with ``base`` it is that model plus seeded noise (a mock fine-tune).

    ``embedding_rows``: pad the vocabulary of the embedding and head to this many rows (a
    model's vocabulary is often padded past its tokenizer's), for tensors of a chosen size.
    """
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if base is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                scale = parameter.float().std().item() if parameter.numel() > 1 else 1.0
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise * (scale or 1.0))
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        if added_tokens:
            # A fine-tune that grew its vocabulary: new tokens, new embedding rows.
            tokenizer.add_tokens(added_tokens)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for embedding in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
                    rows = embedding.weight[-len(added_tokens):]
                    rows.copy_(torch.randn(rows.shape, generator=generator) * 0.02)
    else:
        tokenizer = make_tokenizer(folder) if vocab_size is None else make_tokenizer(folder, vocab_size)
        config_class = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[architecture]
        options = dict(SIZES[size])
        if num_hidden_layers is not None:
            options["num_hidden_layers"] = num_hidden_layers
        options.update(overrides or {})
        tied = architecture == "qwen2" if tie_embeddings is None else tie_embeddings
        config = config_class(
            vocab_size=max(len(tokenizer), embedding_rows or 0),
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=tied,
            rope_scaling=None,
            **options,
        )
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            # from_config leaves norms at exactly 1 and biases at 0; vary them so merges are non-trivial.
            generator = torch.Generator().manual_seed(seed + 1000)
            for name, parameter in model.named_parameters():
                if parameter.ndim == 1:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


def make_family(root: Path, size: str = "tiny", architecture: str = "llama") -> dict[str, Path]:
    """The example family: a base model and two mock fine-tunes of it."""
    root = Path(root)
    base = make_model(root / "base", architecture, size, seed=0)
    math = make_model(root / "math", architecture, size, seed=1, base=base)
    code = make_model(root / "code", architecture, size, seed=2, base=base)
    (root / "family.json").write_text(json.dumps({"size": size, "architecture": architecture}) + "\n")
    return {"base": base, "math": math, "code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(Path(__file__).parent / "models"))
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--architecture", choices=("llama", "mistral", "qwen2"), default="llama")
    args = parser.parse_args()
    marker = Path(args.folder) / "family.json"
    if marker.exists() and json.loads(marker.read_text()) == {"size": args.size, "architecture": args.architecture}:
        print(f"models already in {args.folder}")
        return
    family = make_family(Path(args.folder), args.size, args.architecture)
    for name, path in family.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
