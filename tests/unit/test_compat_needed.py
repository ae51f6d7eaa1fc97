"""The third-party bugs behind the compat patches that show without a process group are still there.

Each probe runs the upstream code unpatched and returns the evidence of the bug; a probe that
finds no bug fails its test, which is the signal to delete the patch (docs/COMPAT.md).  The
megatron probes run in a fresh interpreter (this file run as a script): the CPU shims are
process-wide and cannot be undone, so an interpreter that ever applied them cannot show the
unpatched behaviour.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dapo_megatron.compat import patch

REPO_ROOT = Path(__file__).resolve().parents[2]
# the proxied modules that reference no CUDA device in megatron-core 0.16.1: there the proxy
# is a no-op, kept because 0.19.x was not re-checked (docs/COMPAT.md, cpu-torch-proxy)
PROXY_NOT_NEEDED = {"megatron.core.distributed.finalize_model_grads"}
_CUDA_IN_SOURCE = re.compile(r"""torch\.cuda\.|device\s*=\s*['"]cuda|['"]cuda['"]""")


def _raises_cuda_error(fn: Callable[[], object]) -> str:
    """The CUDA error ``fn`` raises on a CPU-only torch, or AssertionError (bug gone)."""
    try:
        fn()
    except AssertionError as exc:
        if "CUDA" in str(exc):
            return f"{type(exc).__name__}: {exc}"
        raise
    raise AssertionError("returned normally")


def probe_current_device() -> str:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return _raises_cuda_error(lambda: RotaryEmbedding(kv_channels=8, rotary_percent=1.0))


def probe_rng_tracker() -> str:
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    added = _raises_cuda_error(lambda: CudaRNGStatesTracker().add("probe", 1234))
    tracker = CudaRNGStatesTracker()
    tracker.states_["probe"] = torch.get_rng_state()

    def fork() -> None:
        with tracker.fork("probe"):
            pass

    return f"add: {added}; fork: {_raises_cuda_error(fork)}"


def probe_causal_mask() -> str:
    from megatron.core.transformer.utils import get_default_causal_mask

    return _raises_cuda_error(lambda: get_default_causal_mask(4))


def probe_tensor_cuda() -> str:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    source = inspect.getsource(LanguageModule.setup_embeddings_and_output_layer)
    assert ".cuda()" in source, "setup_embeddings_and_output_layer no longer calls .cuda()"
    return "setup_embeddings_and_output_layer calls .cuda(); " + _raises_cuda_error(lambda: torch.zeros(1).cuda())


def probe_torch_proxy() -> str:
    from megatron.core.utils import local_multi_tensor_l2_norm

    modules = [t.removesuffix(".torch") for t in patch("cpu-torch-proxy").targets]
    without = {m for m in modules if not _CUDA_IN_SOURCE.search(inspect.getsource(importlib.import_module(m)))}
    assert without == PROXY_NOT_NEEDED, f"proxied modules without a CUDA reference: {sorted(without)}"
    norm = _raises_cuda_error(lambda: local_multi_tensor_l2_norm(1, None, [[torch.ones(2)]], False))
    return f"{len(modules) - len(without)} proxied modules name CUDA; local_multi_tensor_l2_norm: {norm}"


def probe_tensor_type() -> str:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    try:
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=0.5)
    except AssertionError:
        return f"clip_grad_by_total_norm_fp32 refuses a {param.grad.type()} gradient"
    raise AssertionError("a CPU gradient is accepted")


def probe_writer_preload() -> str:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    buckets = [("file", "key", ([], [(None, torch.zeros(2))]))]
    return _raises_cuda_error(lambda: FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True))


CPU_PROBES: dict[str, Callable[[], str]] = {
    "cpu-current-device": probe_current_device,
    "cpu-rng-tracker": probe_rng_tracker,
    "cpu-causal-mask": probe_causal_mask,
    "cpu-tensor-cuda": probe_tensor_cuda,
    "cpu-torch-proxy": probe_torch_proxy,
    "cpu-tensor-type": probe_tensor_type,
    "cpu-writer-preload": probe_writer_preload,
}


def run_probes() -> dict[str, dict[str, str]]:
    """Every CPU probe in this interpreter: ``{name: {"bug"|"fixed": evidence}}``."""
    results = {}
    for name, probe in CPU_PROBES.items():
        try:
            results[name] = {"bug": probe()}
        except Exception as exc:  # noqa: BLE001 -- a probe that finds no bug, or breaks, is reported
            results[name] = {"fixed": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def cpu_probe_results() -> dict[str, dict[str, str]]:
    if torch.cuda.is_available():
        pytest.skip("the CPU shims' bugs show only on a CPU-only torch")
    pytest.importorskip("megatron.core")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", __file__],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CPU_PROBES))
def test_cpu_shim_still_needed(cpu_probe_results, name):
    result = cpu_probe_results[name]
    assert "bug" in result, f"upstream no longer shows the bug {name} works around: delete the patch? {result}"


def test_megatron_writer_spawns_a_manager_for_its_results():
    """Patch ``sync-save-results-in-process``: upstream's results queue lives in a spawned
    Manager process (in a fresh interpreter: the Manager stays until it exits)."""
    code = (
        "import multiprocessing as mp\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async as fa\n"
        "q = fa._get_write_results_queue()\n"
        "print(type(q).__name__, len(mp.active_children()))\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kind, children = out.stdout.split()
    assert "Proxy" in kind and int(children) >= 1, f"no Manager process any more ({out.stdout}): delete the patch"


def test_vllm_compiles_the_token_rank_count():
    """Patch ``vllm-eager-token-ranks``: upstream's count is a torch.compile wrapper whose
    uncompiled function counts the same ranks."""
    pytest.importorskip("vllm")
    from vllm.v1.sample.ops import logprobs

    compiled = logprobs.batched_count_greater_than
    eager = getattr(compiled, "_torchdynamo_orig_callable", None)
    assert eager is not None, "vLLM no longer compiles the token-rank count: delete the patch"
    x = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.9]])
    assert eager(x, torch.tensor([[0.3], [0.2]])).tolist() == [2, 3]


@pytest.mark.ray
def test_ray_rewrites_loopback_without_local_only_mode(monkeypatch):
    """Patch ``ray-local-only``: without it a loopback node address becomes the outward one."""
    pytest.importorskip("ray")
    from ray._private import ray_constants, services, worker

    if worker._global_node is not None:
        pytest.skip("Ray is running in this process: it answers with its own node address")
    monkeypatch.setattr(services, "node_ip_address_from_perspective", lambda address=None: "192.0.2.7")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # Linux's default
    assert services.resolve_ip_for_localhost("127.0.0.1") == "192.0.2.7", "Ray keeps loopback now: delete the patch"
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # what the patch sets
    assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"


if __name__ == "__main__":
    print(json.dumps(run_probes()))
