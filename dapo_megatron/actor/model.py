"""Build a Megatron-core GPTModel from a Hugging Face llama-family config.

Supported: Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM (dense).  The
architecture-specific flags and the validation (unsupported options raise
ValueError naming the option) come from :mod:`dapo_megatron.models`, so the model
and the weight mapping can never disagree about the layout.

Layer implementation (``actor.transformer_impl``, Megatron-LM's ``--transformer-impl``):
``transformer_engine`` (the default on CUDA) or ``local`` (the default, and the only choice,
without CUDA).  There is no silent fallback: when TE is asked for, by name or by default, and
cannot be imported, the build is refused with the import error.  The local spec's unfused
attention materialises ``[b, heads/tp, s, s]`` scores and an fp32 softmax per layer (about
15 GB per layer at 22k tokens), so a long-context GPU run must not drift onto it unnoticed.
With TE the fusions Megatron-LM turns on by default are on (:func:`fusion_settings`); without
CUDA every fused kernel is off.

The embedding/output vocabulary is padded to a multiple of ``128 * tp``; the
built model carries ``model.hf_vocab_size`` and ``model.padded_vocab_size`` so
consumers can slice logits ``[..., :hf_vocab_size]`` (or mask the padded columns
of the last TP ranks' vocab shards) before any softmax -- padded logits are 0, not -inf.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from dapo_megatron.actor import TRANSFORMER_IMPLS
from dapo_megatron.models import DecoderLayout, divisibility_problems, get_layout, read_rope_theta

__all__ = [
    "TRANSFORMER_IMPLS",
    "transformer_config_from_hf",
    "build_gpt_model",
    "fusion_settings",
    "layer_spec_for",
    "resolve_transformer_impl",
    "transformer_engine_import_problem",
    "RMSNorm",
]

logger = logging.getLogger(__name__)

# Fused kernels off: the CPU has none of them, and the converter builds on CPU/meta.
_UNFUSED = dict(
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
    cross_entropy_loss_fusion=False,
)


def transformer_engine_import_problem() -> str | None:
    """Why ``transformer_engine.pytorch`` cannot be imported here (the error), or None.

    An import, not ``find_spec``: a TE whose compiled library does not match this torch or CUDA
    is found but fails to load, and that must be reported, not mistaken for a working TE.
    """
    try:
        # optional dependency: Transformer Engine (actor.transformer_impl='local' runs without it)
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a broken build raises OSError/RuntimeError as well as ImportError
        return f"import transformer_engine.pytorch failed: {type(e).__name__}: {e}"
    return None


def resolve_transformer_impl(
    requested: str | None,
    *,
    cuda_available: bool,
    te_import_problem: Callable[[], str | None] | None = None,
) -> str:
    """The layer implementation to build: ``requested``, or by default TE on CUDA and local without.

    ``te_import_problem`` (default :func:`transformer_engine_import_problem`) says why TE cannot
    be imported, or None.

    Raises:
        ValueError: naming ``actor.transformer_impl``, for an unknown value, for TE without CUDA,
            and for TE (asked for or defaulted to) that cannot be imported.
    """
    default = requested is None
    impl = ("transformer_engine" if cuda_available else "local") if default else requested
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"actor.transformer_impl: {impl!r} is not one of {', '.join(TRANSFORMER_IMPLS)}")
    if impl == "transformer_engine":
        probe = te_import_problem or transformer_engine_import_problem
        problem = "CUDA is not available" if not cuda_available else probe()
        if problem is not None:
            how = " (the default with CUDA)" if default else ""
            raise ValueError(
                f"actor.transformer_impl=transformer_engine{how} cannot be used: {problem}. Install a "
                "TransformerEngine built for this torch and CUDA, or set actor.transformer_impl=local "
                "knowingly: its unfused attention holds [batch, heads/tp, seq, seq] scores per layer"
            )
    return impl


def fusion_settings(impl: str, *, on_cpu: bool, grad_accum_fusion_available: bool) -> dict:
    """TransformerConfig fusion flags for a layer implementation.

    Without CUDA (or for a CPU/meta build) every fusion is off.  With TE: SwiGLU and
    bias-dropout fusions, fused RoPE (TE's kernel), fused masked softmax, and gradient
    accumulation fusion (wgrad GEMMs accumulate straight into DDP's fp32 ``main_grad``) when
    the ``fused_weight_gradient_mlp_cuda`` extension exists: the output layer is megatron's own
    ColumnParallelLinear, which refuses the flag without it (Megatron-LM turns it off then too).
    The local spec on CUDA keeps megatron's defaults (all off): it is the debugging path.
    """
    if on_cpu:
        return dict(_UNFUSED)
    if impl == "transformer_engine":
        return dict(
            bias_activation_fusion=True,
            bias_dropout_fusion=True,
            apply_rope_fusion=True,
            masked_softmax_fusion=True,
            gradient_accumulation_fusion=grad_accum_fusion_available,
        )
    return {}


def transformer_config_from_hf(
    hf_config,
    *,
    tp: int,
    pp: int,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    cpu_init: bool | None = None,
    transformer_impl: str | None = None,
    **overrides,
):
    """Megatron TransformerConfig for an HF Qwen2/Llama/Qwen3 config.

    Args:
        hf_config: a ``transformers`` PretrainedConfig.
        tp, pp: tensor / pipeline parallel sizes.
        sequence_parallel: Megatron sequence parallelism (requires tp > 1).
        params_dtype: parameter dtype; bf16/fp16 also set the matching config flag.
        cpu_init: build parameters on CPU (``use_cpu_initialization``) with every fused kernel
            off.  None: exactly when CUDA is absent.  True on a GPU host keeps megatron from
            allocating on the current CUDA device (the converter); it implies the local spec.
        transformer_impl: ``transformer_engine``, ``local`` or None (see
            :func:`resolve_transformer_impl`); stored as ``config.transformer_impl``, which
            :func:`layer_spec_for` follows.
        **overrides: extra TransformerConfig fields (e.g. recompute settings), applied last.

    Raises:
        ValueError: unsupported architecture or option (rope scaling, sliding window,
            MoE, non-SiLU activation, biases Megatron cannot express).
    """
    layout = get_layout(hf_config, tp=tp)  # validates the options (rope scaling, MoE, ...)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel requires tp > 1")
    uneven = {
        "pipeline_model_parallel_layout",
        "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage",
    }
    problems = divisibility_problems(layout, tp=tp, pp=1 if uneven & set(overrides) else pp)
    if problems:
        raise ValueError("; ".join(map(str, problems)))
    on_cpu = not torch.cuda.is_available() if cpu_init is None else cpu_init
    impl = resolve_transformer_impl(transformer_impl, cuda_available=not on_cpu)
    grad_accum = not on_cpu and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    if impl == "transformer_engine" and not grad_accum:
        logger.warning("gradient_accumulation_fusion off: the fused_weight_gradient_mlp_cuda extension is missing")
    kwargs = dict(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden_size,
        num_attention_heads=layout.num_attention_heads,
        num_query_groups=layout.num_query_groups,
        kv_channels=layout.head_dim,
        ffn_hidden_size=layout.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        transformer_impl=impl,
        **fusion_settings(impl, on_cpu=on_cpu, grad_accum_fusion_available=grad_accum),
    )
    if on_cpu:
        kwargs.update(use_cpu_initialization=True, batch_p2p_sync=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class RMSNorm(torch.nn.Module):
    """RMSNorm computed exactly like HF's Qwen2/Llama RMSNorm (fp32 statistics).

    Used for every norm of the local (non-TE) spec.  Megatron's torch-norm wrapper
    refuses ``sequence_parallel``; this one supports it: with SP its weight is tagged
    ``sequence_parallel=True`` so ``finalize_model_grads`` all-reduces its gradient over
    the TP group (q/k norms are reduced by Megatron by name).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def layer_spec_for(config, *, te: bool | None = None, vp_stage: int | None = None, pp_rank: int | None = None):
    """Layer spec: TE spec if ``te`` (default: ``config.transformer_impl == "transformer_engine"``).

    Without TE: megatron's local spec with every norm replaced by :class:`RMSNorm`,
    returned as ``TransformerBlockSubmodules`` so the final norm is ours too (this
    makes sequence parallelism work with the local spec).
    """
    te = config.transformer_impl == "transformer_engine" if te is None else te
    if te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    if config.normalization != "RMSNorm":
        raise ValueError(f"unsupported normalization {config.normalization!r} for the local spec")
    spec = copy.deepcopy(
        gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    )
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    if config.qk_layernorm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


def build_gpt_model(
    hf_config,
    *,
    tp: int | None = None,
    pp: int | None = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    parallel_output: bool = True,
    config=None,
    cpu_init: bool | None = None,
    transformer_impl: str | None = None,
    **config_overrides,
):
    """Build this rank's GPTModel (its PP stage, its TP shard) for an HF config.

    Requires :func:`dapo_megatron.actor.parallel.init_parallel` to have run.  ``tp``,
    ``pp``, ``pre_process`` and ``post_process`` default to megatron's parallel state.
    Pass ``config`` to reuse a prepared TransformerConfig.  The model is on CPU on a
    CPU-only machine and on the current CUDA device otherwise; ``cpu_init=True`` keeps it
    off the GPU whatever devices exist (CPU-initialised config, local layer spec, no
    ``.cuda()``), so under ``torch.device("meta")`` nothing is allocated anywhere.
    ``transformer_impl`` chooses the layer implementation (:func:`resolve_transformer_impl`).

    The returned module has attributes ``hf_vocab_size``, ``padded_vocab_size`` and
    ``layout`` (:class:`dapo_megatron.models.DecoderLayout`).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size() if tp is None else tp
    pp = parallel_state.get_pipeline_model_parallel_world_size() if pp is None else pp
    if config is None:
        config = transformer_config_from_hf(
            hf_config,
            tp=tp,
            pp=pp,
            sequence_parallel=sequence_parallel,
            params_dtype=params_dtype,
            cpu_init=cpu_init,
            transformer_impl=transformer_impl,
            **config_overrides,
        )
    layout: DecoderLayout = get_layout(hf_config, tp=tp)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec_for(config, vp_stage=vp_stage),
        vocab_size=layout.padded_vocab_size,
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=layout.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=read_rope_theta(hf_config),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available() and not cpu_init:
        model.cuda(torch.cuda.current_device())
    model.hf_vocab_size = layout.vocab_size
    model.padded_vocab_size = layout.padded_vocab_size
    model.layout = layout
    return model
