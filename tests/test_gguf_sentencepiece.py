"""GGUF targets of models with sentencepiece tokenizers (Llama 2, Mistral 7B v0.1, TinyLlama style):
the vocabulary written as llama.cpp's `llama` tokenizer, read back by the gguf package and by
transformers, whose tokenizer from the file encodes as the source's does.

The tokenizers are real sentencepiece BPE models with byte fallback, trained here on generated
text (no download), with added tokens past the sentencepiece vocabulary and an embedding padded
past those, as fine-tunes have.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest

from conftest import build_json, run_cli

gguf = pytest.importorskip("gguf")
sentencepiece = pytest.importorskip("sentencepiece")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sentencepiece import sentencepiece_model_pb2  # noqa: E402

WORDS = "merge model layer weight token tensor build cache target source rope head norm embed quick brown fox".split()
SPIECE_SIZE = 400
ADDED = {"special": ["<|user|>", "<|assistant|>"], "plain": ["<think>"]}
PAD_ROWS = 5  # embedding rows no token names
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
TEXTS = [
    "the quick brown fox merges a model",
    " leading space and  two  spaces",
    "lines\nand\n\nnewlines\tand a tab",
    "Bytes outside the vocabulary: é, 中文, 😀, Ω",
    "<|user|>hello<|assistant|>hi</s>",
    "a <think> user-defined token",
    "numbers 12345 and CAPITALS",
]


def train_sentencepiece(model_type: str = "bpe", vocab_size: int = SPIECE_SIZE) -> bytes:
    """A sentencepiece model trained on generated sentences: pieces for common words, bytes for the rest."""
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) + f" {i}." for i in range(300)]
    lines += ["def add(a, b):\n    return a + b", "The integral of x squared is x cubed over three."] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def make_sentencepiece_model(folder, architecture: str, dtype: str, seed: int, pad_token: str | None = None):
    """A tiny model whose tokenizer is a sentencepiece BPE (tokenizer.model beside tokenizer.json)."""
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece())
    options = {"pad_token": pad_token} if pad_token else {}
    tokenizer = transformers.LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False, **options)
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED["special"]})
    tokenizer.add_tokens(ADDED["plain"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[architecture]
    config = config_class(
        vocab_size=len(tokenizer) + PAD_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, rope_scaling=None,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{"llama": a bf16 Llama, "mistral": an f16 Mistral padding with <unk>}, both with sentencepiece tokenizers."""
    root = tmp_path_factory.mktemp("sentencepiece")
    return {
        "llama": make_sentencepiece_model(root / "llama", "llama", "bfloat16", seed=0),
        "mistral": make_sentencepiece_model(root / "mistral", "mistral", "float16", seed=1, pad_token="<unk>"),
    }


def build_gguf(workspace, source, kind: str, name: str = "out"):
    path = workspace.write(f"targets:\n  {name}:\n    gguf: {{model: {source}, type: {kind}}}\n")
    report = build_json(path)
    return path, report, workspace.root / "build" / name


def fields(file) -> dict:
    reader = gguf.GGUFReader(file)
    return {key: field.contents() for key, field in reader.fields.items()}


def source_ids(folder, text):
    return transformers.AutoTokenizer.from_pretrained(folder)(text).input_ids


def gguf_ids(folder, text, name="out.gguf"):
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)(text).input_ids


def logits(folder, ids, **options):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_vocabulary_scores_types_and_special_tokens_read_back(workspace, sources, architecture):
    source = sources[architecture]
    _, report, folder = build_gguf(workspace, source, "q8_0")
    assert report["out"]["status"] == "built"
    found = fields(folder / "out.gguf")
    config = json.loads((source / "config.json").read_text())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    assert found["tokenizer.ggml.model"] == "llama" and found["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = found["tokenizer.ggml.tokens"], found["tokenizer.ggml.scores"], found["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == config["vocab_size"] == found["llama.vocab_size"]
    kind = gguf.TokenType
    specials = {tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    for index in range(processor.vocab_size()):  # the sentencepiece vocabulary, piece by piece
        assert tokens[index] == processor.IdToPiece(index)
        if index in specials:  # listed as special added tokens too: control, as the converter makes them
            assert types[index] == kind.CONTROL and scores[index] == -1000.0
            continue
        assert scores[index] == pytest.approx(processor.GetScore(index))
        expected = kind.BYTE if processor.IsByte(index) else kind.NORMAL
        assert types[index] == expected, tokens[index]
    assert sum(t == kind.BYTE for t in types) == 256
    # Added tokens past the sentencepiece vocabulary: special ones control, the others user-defined.
    for token in ADDED["special"] + ADDED["plain"]:
        index = tokenizer.convert_tokens_to_ids(token)
        assert index >= processor.vocab_size() and tokens[index] == token and scores[index] == -1000.0
        assert types[index] == (kind.CONTROL if token in ADDED["special"] else kind.USER_DEFINED)
    # Embedding rows no token names, as the converter names them.
    for index in range(len(tokenizer), config["vocab_size"]):
        assert (tokens[index], scores[index], types[index]) == (f"[PAD{index}]", -10000.0, kind.UNUSED)
    assert found["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == processor.bos_id()
    assert found["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == processor.eos_id()
    assert found["tokenizer.ggml.unknown_token_id"] == tokenizer.unk_token_id == processor.unk_id()
    if architecture == "mistral":
        assert found["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id == processor.unk_id()
    else:
        assert tokenizer.pad_token_id is None and "tokenizer.ggml.padding_token_id" not in found
    assert found["general.architecture"] == "llama"  # Mistral too, as the converter writes it
    assert found["tokenizer.ggml.add_bos_token"] is True and "tokenizer.ggml.merges" not in found
    assert found["tokenizer.chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("architecture, kind", [("llama", "bf16"), ("mistral", "f16")])
def test_loads_in_transformers_with_the_source_logits_and_token_ids(workspace, sources, architecture, kind):
    """bf16 from a bf16 Llama and f16 from an f16 Mistral: the source's logits to the bit, and a
    tokenizer that encodes spaces, newlines, bytes outside the vocabulary and special tokens alike."""
    source = sources[architecture]
    _, _, folder = build_gguf(workspace, source, kind)
    for text in TEXTS:
        assert gguf_ids(folder, text) == source_ids(source, text), text
    ids = source_ids(source, " ".join(TEXTS))
    assert torch.equal(logits(folder, ids, gguf_file="out.gguf"), logits(source, ids))


def test_q8_0_of_a_merge_target_logits_within_tolerance(workspace, sources):
    """The model is a target (a linear merge of the source alone, the same weights): its
    tokenizer.model comes through the target. Relative error of the logits under q8_0 on this
    tiny model: measured 0.009, bound 0.05."""
    source = sources["llama"]
    path = workspace.write(
        f"targets:\n  final:\n    merge_method: linear\n    models:\n      - model: {source}\n"
        "        parameters: {weight: 1.0}\n  out:\n    gguf: {model: final, type: q8_0}\n"
    )
    assert build_json(path)["out"]["status"] == "built"
    folder = workspace.root / "build" / "out"
    assert fields(folder / "out.gguf")["tokenizer.ggml.model"] == "llama"
    ids = source_ids(source, " ".join(TEXTS))
    expected, made = logits(source, ids), logits(folder, ids, gguf_file="out.gguf")
    error = ((made - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.05


def test_without_tokenizer_model_the_pieces_come_from_tokenizer_json(workspace, sources, tmp_path):
    """Only tokenizer.json (as transformers 5 saves a model): the same pieces and types, scores
    in sentencepiece's order, and a file whose tokenizer still encodes like the source's."""
    with_model = fields(build_gguf(workspace, sources["llama"], "bf16", name="full")[2] / "full.gguf")
    source = tmp_path / "json-only"
    shutil.copytree(sources["llama"], source)
    (source / "tokenizer.model").unlink()
    _, report, folder = build_gguf(workspace, source, "bf16")
    assert report["out"]["status"] == "built"
    found = fields(folder / "out.gguf")
    assert found["tokenizer.ggml.model"] == "llama"
    assert found["tokenizer.ggml.tokens"] == with_model["tokenizer.ggml.tokens"]
    assert found["tokenizer.ggml.token_type"] == with_model["tokenizer.ggml.token_type"]
    # Pieces made by merges rank as sentencepiece scores them (no ties: ids do not decide).
    merges = json.loads((source / "tokenizer.json").read_text())["model"]["merges"]
    made = {("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in merges}
    normal = [i for i, t in enumerate(found["tokenizer.ggml.tokens"]) if t in made and found["tokenizer.ggml.token_type"][i] == 1]
    assert len(normal) > 50
    by_json = sorted(normal, key=lambda i: (-found["tokenizer.ggml.scores"][i], -i))
    by_model = sorted(normal, key=lambda i: (-with_model["tokenizer.ggml.scores"][i], -i))
    assert by_json == by_model
    for text in TEXTS:
        assert gguf_ids(folder, text) == source_ids(source, text), text


def test_no_op_rebuild_and_a_new_tokenizer_model(workspace, sources, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(sources["llama"], source)
    path, first, folder = build_gguf(workspace, source, "q8_0")
    file = folder / "out.gguf"
    built = file.read_bytes()
    again = build_json(path)
    assert again["out"]["status"] == "fresh" and again["out"]["tensors_computed"] == 0
    assert file.read_bytes() == built

    # One piece's score changes in tokenizer.model: the file is written again, its tensors from the cache.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((source / "tokenizer.model").read_bytes())
    index = 300
    proto.pieces[index].score = -321.0
    (source / "tokenizer.model").write_bytes(proto.SerializeToString())
    changed = build_json(path)
    assert changed["out"]["status"] == "built" and changed["out"]["tensors_computed"] == 0, changed["out"]
    assert fields(file)["tokenizer.ggml.scores"][index] == -321.0
    assert file.read_bytes() != built and len(file.read_bytes()) == len(built)


def test_added_tokens_json_names_user_defined_tokens(workspace, sources, tmp_path):
    """added_tokens.json (older fine-tunes) puts user-defined tokens on rows past the vocabulary;
    tokenizer_config.json's entries, read after it, win where both name a row."""
    source = tmp_path / "extra"
    shutil.copytree(sources["llama"], source)
    config = json.loads((source / "config.json").read_text())
    row = config["vocab_size"] - 1
    special = transformers.AutoTokenizer.from_pretrained(source).convert_tokens_to_ids(ADDED["special"][0])
    (source / "added_tokens.json").write_text(json.dumps({"<extra>": row, "<shadowed>": special}))
    found = fields(build_gguf(workspace, source, "q8_0")[2] / "out.gguf")
    tokens, scores, types = found["tokenizer.ggml.tokens"], found["tokenizer.ggml.scores"], found["tokenizer.ggml.token_type"]
    assert (tokens[row], scores[row], types[row]) == ("<extra>", -1000.0, gguf.TokenType.USER_DEFINED)
    assert (tokens[special], types[special]) == (ADDED["special"][0], gguf.TokenType.CONTROL)
    assert tokens[row - 1] == f"[PAD{row - 1}]"


@pytest.mark.parametrize("where", ["tokenizer.model", "tokenizer.json"])
def test_a_unigram_tokenizer_is_refused_not_written(workspace, sources, tmp_path, where):
    """llama.cpp's `llama` tokenizer merges by score: a Unigram model would tokenize otherwise."""
    source = tmp_path / "unigram"
    shutil.copytree(sources["llama"], source)
    if where == "tokenizer.model":
        (source / "tokenizer.model").write_bytes(train_sentencepiece("unigram", vocab_size=315))
    else:
        (source / "tokenizer.model").unlink()
        data = json.loads((source / "tokenizer.json").read_text())
        pieces = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])
        data["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [[p, -float(i)] for p, i in pieces], "byte_fallback": True}
        (source / "tokenizer.json").write_text(json.dumps(data))
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {source}, type: q8_0}}\n")
    code, _, err = run_cli("-f", str(path))
    assert code != 0 and "unigram" in err.lower() and "target 'out'" in err, err
    assert not (workspace.root / "build" / "out").exists()


@pytest.mark.parametrize("damage, message", [
    ("garbage", "is not a sentencepiece model"),
    ("empty", "is not a sentencepiece model"),
    ("bad-added-id", "the added token 'x1' is not an id"),
    ("added-past-embedding", "past the model's"),
    ("pieces-past-embedding", "more than the model's"),
])
def test_broken_tokenizer_files_are_an_error_naming_them(workspace, sources, tmp_path, damage, message):
    source = tmp_path / "broken"
    shutil.copytree(sources["llama"], source)
    config = json.loads((source / "config.json").read_text())
    if damage in ("garbage", "empty"):
        (source / "tokenizer.model").write_bytes(b"\x00not a model\xff" * 10 if damage == "garbage" else b"")
    elif damage == "bad-added-id":
        tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
        tokenizer_config["added_tokens_decoder"] = {"x1": {"content": "<a>", "special": True}}
        (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    elif damage == "added-past-embedding":
        (source / "added_tokens.json").write_text(json.dumps({"<far>": config["vocab_size"] + 3}))
    else:
        config["vocab_size"] = SPIECE_SIZE - 10
        (source / "config.json").write_text(json.dumps(config))
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {source}, type: q8_0}}\n")
    code, _, err = run_cli("-f", str(path))
    assert code != 0 and message in err and "target 'out'" in err, err
    assert not (workspace.root / "build" / "out").exists()


def test_without_the_sentencepiece_package_the_plan_says_what_to_install(workspace, sources, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {sources['llama']}, type: q8_0}}\n")
    code, _, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and "needs sentencepiece" in err and "mbuild[gguf]" in err and "Mergefile:3" in err, err
