"""Vocabularies: models whose tokenizers differ merge token by token; tokenizer and chat template choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import make_models
from conftest import load_tensors
from parity import run_mergekit
from mbuild import mergefile, plan
from mbuild.cli import main
from mbuild.errors import MergefileError

ADDED = ["<|tool|>", "<|calc|>"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A base and a fine-tune whose tokenizer grew two tokens (and its embeddings two rows)."""
    root = tmp_path_factory.mktemp("grown")
    base = make_models.make_model(root / "base", "llama", seed=0)
    tools = make_models.make_model(root / "tools", "llama", seed=3, base=base, added_tokens=ADDED)
    other = make_models.make_model(root / "other", "llama", seed=4, base=base)
    return {"base": base, "tools": tools, "other": other}


def recipe(family, tokenizer: str, method="linear", chat_template=None) -> dict:
    body = {
        "merge_method": method,
        "dtype": "float32",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["tools"]), "parameters": {"weight": 0.6, **({"density": 0.5} if method == "ties" else {})}},
            {"model": str(family["other"]), "parameters": {"weight": 0.4, **({"density": 0.5} if method == "ties" else {})}},
        ],
    }
    if method == "linear":
        body["models"].insert(0, {"model": str(family["base"]), "parameters": {"weight": 0.2}})
    body.update(json.loads(tokenizer) if tokenizer.startswith("{") else {"tokenizer_source": tokenizer})
    if chat_template:
        body["chat_template"] = chat_template
    return body


def build(tmp_path: Path, body: dict) -> Path:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "Mergefile"
    path.write_text(yaml.safe_dump({"targets": {"merged": body}}))
    assert main(["-f", str(path), "-q"]) == 0
    return tmp_path / "build" / "merged"


TOKENIZERS = [
    "union",
    "base",
    "TOOLS",
    '{"tokenizer": {"source": "union", "pad_to_multiple_of": 8}}',
    '{"tokenizer": {"source": "union", "tokens": {"<|calc|>": {"source": {"kind": "zero"}}, '
    '"<s>": {"source": "TOOLS", "force": true}, "<|new|>": {"source": {"kind": "model_token", "model": "BASE", "token": "</s>"}}}}}',
]


@pytest.mark.parametrize("tokenizer", TOKENIZERS, ids=["union", "base", "model", "padded", "token-rules"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_aligned_vocabularies_match_mergekit(grown, tmp_path, tokenizer, method):
    pytest.importorskip("mergekit")
    tokenizer = tokenizer.replace("TOOLS", str(grown["tools"])).replace("BASE", str(grown["base"]))
    body = recipe(grown, tokenizer, method)
    ours = build(tmp_path / "mbuild", body)
    theirs = tmp_path / "mergekit"
    run_mergekit(body, theirs)
    a, b = load_tensors(ours), load_tensors(theirs)
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == json.loads(
        (theirs / "config.json").read_text()
    )["vocab_size"]
    import transformers

    ours_tok = transformers.AutoTokenizer.from_pretrained(ours)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(theirs)
    assert ours_tok.get_vocab() == theirs_tok.get_vocab()


def test_union_adds_the_new_tokens_and_the_model_loads(grown, tmp_path):
    import transformers

    out = build(tmp_path, recipe(grown, "union"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    base_size = len(transformers.AutoTokenizer.from_pretrained(grown["base"]))
    assert len(tokenizer) == base_size + 2
    ids = tokenizer("<|tool|> then <|calc|>", return_tensors="pt").input_ids
    assert {tokenizer.convert_tokens_to_ids(t) for t in ADDED} <= set(ids[0].tolist())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == base_size + 2
    assert torch.isfinite(model(ids).logits).all()
    # A token only 'tools' has: every model's row for it is tools' row, so the merge is that row.
    tensors, tools = load_tensors(out), load_tensors(grown["tools"])
    new_id = tokenizer.convert_tokens_to_ids("<|tool|>")
    tools_id = transformers.AutoTokenizer.from_pretrained(grown["tools"]).convert_tokens_to_ids("<|tool|>")
    merged = tensors["model.embed_tokens.weight"][new_id].float()
    assert torch.allclose(merged, tools["model.embed_tokens.weight"][tools_id].float(), atol=1e-2)


def test_different_vocabularies_without_a_tokenizer_source_is_a_clear_error(grown, tmp_path):
    import yaml

    body = recipe(grown, "union")
    del body["tokenizer_source"]
    path = tmp_path / "Mergefile"
    path.write_text(yaml.safe_dump({"targets": {"merged": body}}))
    with pytest.raises(MergefileError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    assert "vocabulary sizes differ" in caught.value.message and "tokenizer_source" in caught.value.message
    assert caught.value.location.target == "merged"


def test_a_second_plan_reads_the_stored_vocabulary_without_transformers(grown, tmp_path):
    import subprocess
    import sys

    out = build(tmp_path, recipe(grown, "union"))
    assert out.exists()
    script = (
        "import sys; from mbuild.cli import main; "
        f"code = main(['all', '-f', {str(tmp_path / 'Mergefile')!r}, '-q']); "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules; sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("template", ["chatml", "auto", "{% for m in messages %}{{ m['content'] }}{% endfor %}"])
def test_chat_template_choice(grown, tmp_path, template):
    import transformers

    out = build(tmp_path, recipe(grown, "base", chat_template=template))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    if template == "chatml":
        assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    elif template == "auto":
        assert tokenizer.chat_template == make_models.CHAT_TEMPLATE  # every input has this one
    else:
        assert rendered == "hi"


def test_unknown_chat_template_name(grown, tmp_path):
    import yaml

    path = tmp_path / "Mergefile"
    path.write_text(yaml.safe_dump({"targets": {"merged": recipe(grown, "base", chat_template="chatlm")}}))
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    assert "did you mean 'chatml'" in caught.value.message
