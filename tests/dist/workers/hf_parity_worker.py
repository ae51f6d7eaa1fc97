"""Logits / log-prob parity between our Megatron GPTModel (loaded from an HF dir) and HF.

Usage (under torchrun; or as a plain single process for layout 1x1)::

    torchrun --nproc_per_node=2 hf_parity_worker.py --layouts 1x1,2x1,2x1sp,1x2 \
        [--check-errors] HF_DIR [HF_DIR ...]

Layouts are TPxPP with an optional ``sp`` suffix (sequence parallel); all of them
are checked in one launch.  For each layout and HF checkpoint directory: builds
the Megatron model, loads the HF weights, checks that the mapping covers exactly
the model's parameters and the HF tensors and that exporting the loaded model
(TP all-gather + merge) gives the HF tensors back bit-exactly, runs a forward pass
on fixed random tokens (PP stages hand hidden states over with send/recv), gathers
the vocab-parallel logits (test only), trims the vocab padding, and compares
logits and per-token log-probs with ``AutoModelForCausalLM`` in fp32.
``--check-errors`` also checks the load error messages (missing tensor, wrong shape).
Exits non-zero on any mismatch; the last rank prints one ``PARITY ...`` line per check."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

TOL = 1e-4


def _hf_reference(hf_dir: str, input_ids: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float(), model.config


def _token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def check_weights(model, loaded: list[str], hf_dir: str, hf_config, sp: bool) -> None:
    """Name coverage both ways, bit-exact export, SP tags on the norms."""
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    from dapo_megatron.actor.hf_loading import iter_hf_weights, layer_offset_of
    from dapo_megatron.models.mapping import get_mapping

    # the mapping's name list for this stage is exactly the model's parameter list
    mapping = get_mapping(hf_config, tp=ps.get_tensor_model_parallel_world_size())
    offset = layer_offset_of(model)
    expected = mapping.megatron_names(
        layers=range(offset, offset + len(model.decoder.layers)),
        pre_process=model.pre_process,
        post_process=model.post_process,
        include_tied_output=not model.pre_process,
    )
    assert sorted(expected) == sorted(loaded), (expected, loaded)
    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt") as f:
        if ps.get_pipeline_model_parallel_world_size() == 1:  # every HF tensor is used
            hf_keys = set(f.keys()) - ({"lm_head.weight"} if hf_config.tie_word_embeddings else set())
            used = {n for name in loaded for n in mapping.hf_names_for(name)}
            assert used == hf_keys, sorted(used ^ hf_keys)
        # export (TP all-gather + merge) gives back the HF tensors bit-exactly
        n_exported = 0
        for hf_name, t in iter_hf_weights(model, hf_config):
            assert torch.equal(t, f.get_tensor(hf_name)), hf_name
            n_exported += 1
    stage_hf = [
        n
        for name in loaded
        if not (name == "output_layer.weight" and hf_config.tie_word_embeddings)
        for n in mapping.hf_names_for(name, offset)
    ]
    assert n_exported == len(stage_hf) > 0, (n_exported, stage_hf)
    if sp:
        for name, p in model.named_parameters():
            if name.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight")):
                assert getattr(p, "sequence_parallel", False), name


def megatron_logits(hf_dir: str, hf_config, input_ids: torch.Tensor, explicit_mask: bool, sp: bool = False):
    """Full-vocab (trimmed) logits [b, s, V] of our model on every rank (None off the last stage)."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model

    model = build_gpt_model(hf_config, sequence_parallel=sp)
    model.eval()
    loaded = load_hf_weights_into_model(model, hf_dir, hf_config)
    assert loaded and len(loaded) == len(list(model.parameters()))
    check_weights(model, loaded, hf_dir, hf_config, sp)

    b, s = input_ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1) if explicit_mask else None
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp_rank > 0:
            recv = torch.empty(s, b, hf_config.hidden_size)
            dist.recv(recv, group=pp_group, group_src=pp_rank - 1)
            model.set_input_tensor(recv)
        out = model(input_ids=input_ids if pp_rank == 0 else None, position_ids=position_ids, attention_mask=mask)
        if pp_rank < pp_size - 1:
            dist.send(out.contiguous(), group=pp_group, group_dst=pp_rank + 1)
            return None
    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(parts, out.contiguous(), group=tp_group)
    full = torch.cat(parts, dim=-1)
    assert full.shape[-1] == model.padded_vocab_size
    # padded vocabulary rows are zero -> their logits are exactly 0
    assert torch.count_nonzero(full[..., model.hf_vocab_size :]) == 0
    return full[..., : model.hf_vocab_size]


def check_load_errors(hf_dir: str) -> None:
    """A missing HF tensor or a wrong shape fails loudly, naming the tensor."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model

    hf_config = AutoConfig.from_pretrained(hf_dir)
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    model = build_gpt_model(hf_config)
    load_hf_weights_into_model(model, state, hf_config)  # state-dict input works

    name = "model.layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in state.items() if k != name}
    try:
        load_hf_weights_into_model(model, missing, hf_config)
    except KeyError as e:
        assert name in str(e), e
    else:
        raise AssertionError("missing tensor not reported")

    name = "model.layers.0.self_attn.o_proj.weight"
    bad = dict(state)
    bad[name] = bad[name][:, :-1]
    try:
        load_hf_weights_into_model(model, bad, hf_config)
    except ValueError as e:
        assert name in str(e) and "shape" in str(e), e
    else:
        raise AssertionError("shape mismatch not reported")


def check_layout(tp: int, pp: int, hf_dirs: list[str], seed: int = 1234, sp: bool = False) -> list[str]:
    from transformers import AutoConfig

    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    lines = []
    init_parallel(tp, pp, seed=seed)
    try:
        for i, hf_dir in enumerate(hf_dirs):
            hf_config = AutoConfig.from_pretrained(hf_dir)
            gen = torch.Generator().manual_seed(seed + i)
            input_ids = torch.randint(0, hf_config.vocab_size, (2, 24), generator=gen)
            ours = megatron_logits(hf_dir, hf_config, input_ids, explicit_mask=i % 2 == 0, sp=sp)
            if ours is None:
                continue
            ref, _ = _hf_reference(hf_dir, input_ids)
            d_logits = (ours - ref).abs().max().item()
            d_lp = (_token_logprobs(ours, input_ids) - _token_logprobs(ref, input_ids)).abs().max().item()
            line = (
                f"PARITY tp={tp} pp={pp} sp={int(sp)} model={os.path.basename(hf_dir)} "
                f"max_abs_logits={d_logits:.3e} max_abs_logprob={d_lp:.3e}"
            )
            lines.append(line)
            assert d_logits < TOL and d_lp < TOL, line
    finally:
        destroy_parallel(destroy_process_group=False)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts, 'sp' suffix = +SP")
    ap.add_argument("--check-errors", action="store_true", help="also check load error messages")
    ap.add_argument("hf_dirs", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for spec in args.layouts.split(","):
        sp = spec.endswith("sp")
        tp, pp = (int(x) for x in spec.removesuffix("sp").split("x"))
        lines = check_layout(tp, pp, args.hf_dirs, sp=sp)  # asserts on every last-stage rank
        if dist.get_rank() == dist.get_world_size() - 1:  # always on the last PP stage
            for line in lines:
                print(line, flush=True)
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    if args.check_errors:
        init_parallel(dist.get_world_size(), 1, seed=0)
        check_load_errors(args.hf_dirs[0])
        if dist.get_rank() == 0:
            print("ERRORS-OK", flush=True)
    dist.barrier()
    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
