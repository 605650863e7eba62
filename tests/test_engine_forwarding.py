"""Unknown engine attributes forward to the wrapped model, as DeepSpeed's engine does (issue 12.7)."""

from __future__ import annotations

import pytest

from hf_zero.engine.engine import ZeroEngine
from launch import launch


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fwd")
    return launch(1, "compat_scenarios:forwarding", {"stage": 1}, out, timeout=300)[0]


def test_generate_and_model_methods_forward(result):
    assert result["generated"] == result["direct"] and len(result["generated"][0]) == 7
    assert result["forwarded_is_module_method"]
    assert result["checkpointing"] is True
    assert result["vocab_via_engine"] > 0


def test_engine_attributes_win_over_the_models(result):
    assert result["engine_config_is_zero"] == "ZeroConfig" and result["model_config"] == "LlamaConfig"


def test_missing_attribute_names_engine_and_model(result):
    assert "no_such_attribute_xyz" in result["missing"] and "LlamaForCausalLM" in result["missing"]


def test_no_recursion_before_init_or_for_dunders():
    bare = ZeroEngine.__new__(ZeroEngine)  # as copy/pickle create it: no __dict__ entries yet
    with pytest.raises(AttributeError, match="'module'"):
        bare.module
    with pytest.raises(AttributeError, match="get_input_embeddings"):
        bare.get_input_embeddings
    with pytest.raises(AttributeError):
        bare.__setstate_custom__
