"""Broken model directories fail with an error naming the file and what was expected."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from pdserve import LLM
from pdserve.common.errors import ModelLoadError
from tests.support.hf_models import make_hf_model


@pytest.fixture
def model_dir(tmp_path):
    make_hf_model("llama", tmp_path)
    return tmp_path


def test_missing_weights_file(model_dir) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        LLM(model=str(model_dir))


def test_corrupt_weights_file(model_dir) -> None:
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read"):
        LLM(model=str(model_dir))


def test_missing_tensor_is_named(model_dir) -> None:
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 weight.*layers\.1\.mlp\.gate_up_proj"):
        LLM(model=str(model_dir))


def test_shape_mismatch_is_named(model_dir) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight. has shape .*the config implies"):
        LLM(model=str(model_dir))


def test_bad_json_and_missing_keys(model_dir) -> None:
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        LLM(model=str(model_dir))
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=r"missing required key 'hidden_size'"):
        LLM(model=str(model_dir))


def test_unsupported_rope_type(model_dir) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"rope type 'yarn' is not supported"):
        LLM(model=str(model_dir))


def test_missing_shard_named_by_index(model_dir, tmp_path_factory) -> None:
    sharded = tmp_path_factory.mktemp("sharded")
    make_hf_model("llama", sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"{shard.name}.*missing"):
        LLM(model=str(sharded))


def test_dummy_weights_need_no_checkpoint(model_dir) -> None:
    (model_dir / "model.safetensors").unlink()
    llm = LLM(model=str(model_dir), load_format="dummy", num_kv_blocks=16, max_model_len=64)
    assert len(llm.generate("hi")[0].token_ids) > 0
