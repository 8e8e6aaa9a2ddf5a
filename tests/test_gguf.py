"""GGUF targets (`gguf: {model: ..., type: ...}`): the file read back by the gguf package, loaded
by transformers (logits and tokenizer against the source), and built like any target.

Tolerances for quantized types, on the tiny models here (hidden size 64, random weights), as
relative errors ‖gguf − source‖ / ‖source‖: each weight transformers reads back under 0.01 for
q8_0 and 0.15 for q4_0 (measured at most 0.0056 and 0.088), the logits under 0.05 and 0.5
(measured 0.013 and 0.31). A misplaced or unpermuted weight is off by more than 1.
"""

from __future__ import annotations

import json

import pytest

from conftest import build_json, make_models, run_cli

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b  # the quick brown fox <|user|> hi"


def gguf_mergefile(workspace, source, targets: dict[str, str]):
    """A Mergefile with a linear target `final` over ``source`` and a GGUF target per (name -> type) of it."""
    lines = [
        "targets:",
        "  final:",
        "    merge_method: linear",
        "    models:",
        f"      - model: {source}",
        "        parameters: {weight: 1.0}",
    ]
    for name, kind in targets.items():
        model = kind.split("@")[1] if "@" in kind else "final"
        lines += [f"  {name}:", f"    gguf: {{model: {model}, type: {kind.split('@')[0]}}}"]
    return workspace.write("\n".join(lines) + "\n")


def source_ids(folder, text=TEXT) -> list[int]:
    """``text`` encoded as the source's tokenizer.json says.

    Not through AutoTokenizer: for a Qwen2 config it builds Qwen2's own pre-tokenizer whatever
    the file says, and these tiny models' tokenizer splits text as GPT-2's does.
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def logits(model_folder, ids, **options):
    """The logits (float32) of token ``ids`` under a model folder (or a GGUF file in it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32, **options)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def gguf_ids(folder, name, text=TEXT) -> list[int]:
    """``text`` encoded by the tokenizer transformers reads from a GGUF file."""
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)(text).input_ids


def relative_error(source, made) -> float:
    return ((made - source).norm() / source.norm()).item()


def test_file_reads_back_with_llama_cpp_names_types_and_metadata(workspace, llama):
    path = gguf_mergefile(workspace, llama["base"], {"final-q8": "q8_0"})
    report = build_json(path)
    assert report["final-q8"]["status"] == "built"
    folder = workspace.root / "build" / "final-q8"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "final-q8.gguf", "mbuild.json"]
    reader = gguf.GGUFReader(folder / "final-q8.gguf")
    config = json.loads((llama["base"] / "config.json").read_text())
    layers = config["num_hidden_layers"]

    tensors = {t.name: t for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{part}.weight" for i in range(layers) for part in per_layer}
    assert set(tensors) == expected
    # Embeddings, the layers in turn, then the final norm and the head.
    names = [t.name for t in reader.tensors]
    assert names[0] == "token_embd.weight" and names[-2:] == ["output_norm.weight", "output.weight"]
    assert names.index("blk.1.attn_q.weight") < names.index("blk.2.attn_norm.weight")
    q8, f32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == q8 and tensors["token_embd.weight"].tensor_type == q8
    assert tensors["blk.0.attn_norm.weight"].tensor_type == f32 and tensors["output_norm.weight"].tensor_type == f32
    # GGUF lists dimensions innermost first.
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [hidden, kv]
    assert list(tensors["token_embd.weight"].shape) == [hidden, config["vocab_size"]]

    def field(key):
        found = reader.fields[key]
        return found.contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert field("llama.context_length") == config["max_position_embeddings"]
    assert field("llama.block_count") == layers
    assert field("llama.embedding_length") == hidden
    assert field("llama.feed_forward_length") == config["intermediate_size"]
    assert field("llama.attention.head_count") == config["num_attention_heads"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field("llama.rope.dimension_count") == config["head_dim"]
    assert field("llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokenizer = json.loads((llama["base"] / "tokenizer.json").read_text())
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    assert all(tokens[i] == t for t, i in tokenizer["model"]["vocab"].items())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    assert field("tokenizer.ggml.merges") == merges
    assert field("tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert field("tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert field("tokenizer.ggml.token_type")[tokens.index("<|user|>")] == gguf.TokenType.CONTROL
    assert field("tokenizer.chat_template") == (llama["base"] / "chat_template.jinja").read_text()


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_bf16_loads_in_transformers_with_the_source_logits_exactly(workspace, families, architecture):
    source = families(architecture)["base"]
    path = gguf_mergefile(workspace, source, {"out": "bf16"})
    build_json(path)
    ids = source_ids(source)
    assert gguf_ids(workspace.root / "build" / "out", "out.gguf") == ids  # the GGUF's tokenizer encodes alike
    if architecture != "qwen2":
        assert transformers.AutoTokenizer.from_pretrained(source)(TEXT).input_ids == ids
    expected = logits(source, ids)
    made = logits(workspace.root / "build" / "out", ids, gguf_file="out.gguf")
    assert torch.equal(made, expected)


def test_f16_from_an_f16_source_is_exact(workspace, tmp_path):
    source = make_models.make_model(tmp_path / "f16", "llama", "tiny", seed=3, dtype="float16")
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {source}, type: f16}}\n")
    assert build_json(path)["out"]["status"] == "built"
    reader = gguf.GGUFReader(workspace.root / "build" / "out" / "out.gguf")
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.F16}
    ids = source_ids(source)
    assert gguf_ids(workspace.root / "build" / "out", "out.gguf") == ids
    assert torch.equal(logits(workspace.root / "build" / "out", ids, gguf_file="out.gguf"), logits(source, ids))


@pytest.mark.parametrize("kind, weights, tolerance", [("q8_0", 0.01, 0.05), ("q4_0", 0.15, 0.5)])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_quantized_weights_and_logits_within_tolerance(workspace, families, architecture, kind, weights, tolerance):
    source = families(architecture)["base"]
    path = gguf_mergefile(workspace, source, {"out": kind})
    build_json(path)
    folder = workspace.root / "build" / "out"
    reader = gguf.GGUFReader(folder / "out.gguf")
    assert gguf.GGMLQuantizationType[kind.upper()] in {t.tensor_type for t in reader.tensors}
    # Every weight transformers reads back is the source's, up to the quantization error.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="out.gguf", dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    made = loaded.state_dict()
    assert set(made) == set(original)
    for name, tensor in original.items():
        assert relative_error(tensor, made[name]) < weights, name
    ids = source_ids(source)
    error = relative_error(logits(source, ids), logits(folder, ids, gguf_file="out.gguf"))
    assert 0 < error < tolerance


def test_a_target_like_any_other(workspace, llama, capsys):
    path = gguf_mergefile(workspace, llama["base"], {"final-q8": "q8_0"})
    planned = json.loads(run_cli("-f", str(path), "--dry-run", "--json", "final-q8")[1])["targets"]
    assert set(planned) == {"final", "final-q8"}  # its model, a target, comes first
    assert planned["final-q8"]["method"] == "gguf" and planned["final-q8"]["stale"]

    first = build_json(path)
    assert first["final"]["status"] == "built" and first["final-q8"]["status"] == "built"
    gguf_file = workspace.root / "build" / "final-q8" / "final-q8.gguf"
    built = gguf_file.read_bytes()

    again = build_json(path)  # nothing changed: nothing done
    assert {r["status"] for r in again.values()} == {"fresh"}
    assert again["final-q8"]["tensors_computed"] == 0
    code, out, _ = run_cli("explain", "-f", str(path), "final-q8")
    assert code == 0 and "final-q8" in out

    # Another type: rebuilt, every tensor re-encoded.
    gguf_mergefile(workspace, llama["base"], {"final-q8": "q4_0"})
    code, out, _ = run_cli("explain", "-f", str(path), "final-q8")
    assert code == 0 and 'gguf.type: "q8_0" → "q4_0"' in out and 'parameters.type: "Q8_0" → "Q4_0"' in out, out
    assert "parameters.shape" not in out, out  # only what changed
    changed = build_json(path)
    assert changed["final"]["status"] == "fresh"
    assert changed["final-q8"]["status"] == "built" and changed["final-q8"]["tensors_computed"] > 0
    assert any("type" in reason for reason in changed["final-q8"]["reasons"]), changed["final-q8"]["reasons"]
    assert gguf_file.read_bytes() != built

    # Back to q8_0: the bytes come from the cache, and are those first built.
    back = build_json(gguf_mergefile(workspace, llama["base"], {"final-q8": "q8_0"}))
    assert back["final-q8"]["status"] == "built" and back["final-q8"]["tensors_computed"] == 0
    assert gguf_file.read_bytes() == built

    # Its model's bytes change (the merge reads another model): rebuilt.
    moved = build_json(gguf_mergefile(workspace, llama["math"], {"final-q8": "q8_0"}))
    assert moved["final"]["status"] == "built" and moved["final-q8"]["status"] == "built"
    assert moved["final-q8"]["tensors_computed"] > 0


def test_a_type_of_the_same_size_is_not_taken_for_another(workspace, llama):
    """bf16 and f16 encode to the same number of bytes: the type itself is in every key."""
    path = gguf_mergefile(workspace, llama["base"], {"out": "bf16"})
    build_json(path)
    file = workspace.root / "build" / "out" / "out.gguf"
    before = file.read_bytes()
    report = build_json(gguf_mergefile(workspace, llama["base"], {"out": "f16"}))
    assert len(file.read_bytes()) == len(before) and file.read_bytes() != before
    matrices = [t for t in gguf.GGUFReader(file).tensors if len(t.shape) == 2]
    assert {t.tensor_type for t in matrices} == {gguf.GGMLQuantizationType.F16}
    # Every matrix encoded again; the norms (F32 in both) taken as they were.
    assert report["out"]["status"] == "built" and report["out"]["tensors_computed"] == len(matrices)


def test_the_same_model_twice_is_one_set_of_tensor_tasks(workspace, llama):
    """Two GGUF targets of one model and type share every task key (computed once, cached)."""
    path = gguf_mergefile(workspace, llama["base"], {"a": "q8_0", "b": "q8_0"})
    report = build_json(path)
    assert report["a"]["tensors_computed"] > 0 and report["b"]["tensors_computed"] == 0
    a = (workspace.root / "build" / "a" / "a.gguf").read_bytes()
    b = (workspace.root / "build" / "b" / "b.gguf").read_bytes()
    assert len(a) == len(b) and a != b  # only general.name differs


@pytest.mark.parametrize(
    "body, message",
    [
        ("gguf: {model: final, type: q4_k}", "unknown GGUF type 'q4_k'"),
        ("gguf: {model: final}", "unknown GGUF type None"),
        ("gguf: {model: final, type: q8_0, bits: 4}", "bits"),
        ("gguf: final", "'gguf' is a mapping"),
    ],
)
def test_bad_bodies_are_refused_with_their_line(workspace, llama, body, message):
    path = workspace.write(
        f"targets:\n  final:\n    merge_method: linear\n    models:\n      - model: {llama['base']}\n  out:\n    {body}\n"
    )
    code, out, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and message in err and "Mergefile:7" in err, err


def test_a_gguf_target_is_no_model_for_another(workspace, llama):
    path = workspace.write(
        f"targets:\n  out:\n    gguf: {{model: {llama['base']}, type: q8_0}}\n"
        "  again:\n    merge_method: linear\n    models:\n      - model: out\n"
    )
    code, _, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and "'out' is a GGUF target" in err and "Mergefile:7" in err, err


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "BF16", "F16", "F32"])
def test_encoding_in_row_chunks_gives_the_package_bytes_of_the_whole_tensor(monkeypatch, kind):
    """Rows are encoded a chunk at a time (memory); the bytes are `gguf.quants.quantize` of the
    whole tensor, rows permuted as llama.cpp's rope wants (each head's halves interleaved)."""
    import numpy as np

    from mbuild.io import gguf_file

    heads, rows, width = 4, 96, 64
    tensor = torch.randn(rows, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = tensor.float().numpy().reshape(heads, 2, rows // heads // 2, width).swapaxes(1, 2).reshape(rows, width)
    expected = gguf.quants.quantize(np.ascontiguousarray(whole), gguf.GGMLQuantizationType[kind]).view(np.uint8).reshape(-1)
    monkeypatch.setattr(gguf_file, "ENCODE_CHUNK", 5 * width)  # 5 rows at a time
    assert np.array_equal(gguf_file.encode(tensor, kind, (rows, width), permute=heads), expected)


def test_values_f16_cannot_hold_are_an_error_naming_the_tensor(workspace, llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    source = tmp_path / "loud"
    shutil.copytree(llama["base"], source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {source}, type: f16}}\n")
    code, _, err = run_cli("-f", str(path))
    assert code != 0 and "blk.2.ffn_up.weight" in err and "float16" in err, err
    assert not (workspace.root / "build" / "out").exists()


def test_tensor_types_follow_the_converters_rules():
    from mbuild.plan.kinds import gguf as kind

    assert kind.tensor_type(gguf, (64,), "q4_0") == "F32"  # 1-D: F32 whatever the file's type
    assert kind.tensor_type(gguf, (8, 64), "q4_0") == "Q4_0"
    assert kind.tensor_type(gguf, (8, 48), "q4_0") == "F16"  # rows not whole 32-blocks
    assert kind.tensor_type(gguf, (8, 48), "bf16") == "BF16"
    assert kind.encoded_bytes(gguf, (8, 64), "Q8_0") == 8 * 2 * 34


def test_an_architecture_llama_cpp_is_not_told_about_is_refused_before_any_read(workspace, llama, tmp_path):
    import shutil

    source = tmp_path / "other"
    shutil.copytree(llama["base"], source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {source}, type: q8_0}}\n")
    code, _, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and "'phi3'" in err and "llama, mistral, qwen2" in err and "Mergefile:3" in err, err


def test_pre_tokenizer_names_split_text_as_transformers_reads_them():
    """The Split patterns mbuild names `llama-bpe` and `qwen2` are those transformers' GGUF
    loader splits by for those names (Llama 3's and Qwen2's tokenizer.json patterns)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from mbuild.io.gguf_tokenizer import PRE_TOKENIZERS, _pre_tokenizer

    assert sorted(PRE_TOKENIZERS.values()) == ["llama-bpe", "qwen2"]
    for pattern, name in PRE_TOKENIZERS.items():
        assert mapping.GGUF_PRE_TOKENIZER_SPLITS[name] == pattern
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        assert _pre_tokenizer({"type": "Sequence", "pretokenizers": [split, level]}) == name
    assert _pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    assert _pre_tokenizer({"type": "Metaspace", "replacement": "▁"}) is None  # sentencepiece: refused


def test_a_tokenizer_it_cannot_write_is_an_error_not_a_wrong_file(workspace, llama, tmp_path):
    import shutil

    source = tmp_path / "spm"
    shutil.copytree(llama["base"], source)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    path = workspace.write(f"targets:\n  out:\n    gguf: {{model: {source}, type: q8_0}}\n")
    code, _, err = run_cli("-f", str(path))
    assert code != 0 and "byte-level BPE" in err and "target 'out'" in err, err
    assert not (workspace.root / "build" / "out").exists()
