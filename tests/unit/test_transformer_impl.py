"""actor.transformer_impl: the layer implementation is chosen explicitly, never by a silent fallback.

What runs on a GPU (TE's kernels) cannot run here; these pin the choice, the refusal and the
fusion flags, and that a CUDA host without a usable TE is refused rather than given the local spec.
"""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.actor import model as model_module
from dapo_megatron.actor.model import fusion_settings, resolve_transformer_impl
from tests.tiny_models import tiny_config


def _te_ok() -> None:
    return None


def _te_broken() -> str:
    return "import transformer_engine.pytorch failed: OSError: libtransformer_engine.so: undefined symbol"


def test_default_is_te_with_cuda_and_local_without():
    assert resolve_transformer_impl(None, cuda_available=True, te_import_problem=_te_ok) == "transformer_engine"
    assert resolve_transformer_impl(None, cuda_available=False, te_import_problem=_te_broken) == "local"


def test_local_is_honoured_with_cuda():
    assert resolve_transformer_impl("local", cuda_available=True, te_import_problem=_te_broken) == "local"


@pytest.mark.parametrize(
    ("requested", "cuda", "message"),
    [
        (None, True, r"transformer_impl=transformer_engine \(the default with CUDA\) cannot be used: import "),
        ("transformer_engine", True, r"transformer_impl=transformer_engine cannot be used: import .*undefined symbol"),
        ("transformer_engine", False, r"transformer_impl=transformer_engine cannot be used: CUDA is not available"),
        ("apex", True, r"actor\.transformer_impl: 'apex' is not one of transformer_engine, local"),
    ],
)
def test_unusable_or_unknown_impl_is_refused_by_name(requested, cuda, message):
    with pytest.raises(ValueError, match=message):
        resolve_transformer_impl(requested, cuda_available=cuda, te_import_problem=_te_broken)


def test_fusions():
    off = fusion_settings("local", on_cpu=True, grad_accum_fusion_available=True)
    assert off and not any(off.values())
    te = fusion_settings("transformer_engine", on_cpu=False, grad_accum_fusion_available=True)
    assert te == dict(
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=True,
        masked_softmax_fusion=True,
        gradient_accumulation_fusion=True,
    )
    # megatron's output layer refuses the flag without the extension
    assert not fusion_settings("transformer_engine", on_cpu=False, grad_accum_fusion_available=False)[
        "gradient_accumulation_fusion"
    ]
    assert fusion_settings("local", on_cpu=False, grad_accum_fusion_available=True) == {}


def _qwen2():
    return tiny_config(rms_norm_eps=1e-5)


def test_cuda_host_without_te_is_refused_not_given_the_local_spec(monkeypatch):
    """The old behaviour: TE missing on a GPU host quietly built the local spec."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_module, "transformer_engine_import_problem", _te_broken)
    with pytest.raises(ValueError, match=r"default with CUDA\) cannot be used"):
        model_module.transformer_config_from_hf(_qwen2(), tp=1, pp=1)


def test_cuda_host_asked_for_local_builds_the_local_spec(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tc = model_module.transformer_config_from_hf(_qwen2(), tp=1, pp=1, transformer_impl="local")
    assert tc.transformer_impl == "local" and not tc.use_cpu_initialization
    assert not tc.apply_rope_fusion and not tc.gradient_accumulation_fusion
    spec = model_module.layer_spec_for(tc, pp_rank=0)
    assert spec.layer_specs[0].submodules.input_layernorm is model_module.RMSNorm


def test_cpu_config_is_local_and_unfused():
    tc = model_module.transformer_config_from_hf(_qwen2(), tp=1, pp=1)
    assert tc.transformer_impl == "local" and tc.use_cpu_initialization
    assert not any(getattr(tc, k) for k in fusion_settings("local", on_cpu=True, grad_accum_fusion_available=False))


def test_te_config_with_its_fusions_passes_megatrons_checks(monkeypatch):
    """On a (pretend) CUDA host with TE: megatron's own config validation accepts our TE flags."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_module, "transformer_engine_import_problem", _te_ok)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)  # TE's kernel
    tc = model_module.transformer_config_from_hf(_qwen2(), tp=1, pp=1)
    assert tc.transformer_impl == "transformer_engine" and not tc.use_cpu_initialization
    assert tc.apply_rope_fusion and tc.bias_activation_fusion and tc.bias_dropout_fusion
    # no fused_weight_gradient_mlp_cuda extension here: megatron's output layer would refuse the flag
    assert not tc.gradient_accumulation_fusion
