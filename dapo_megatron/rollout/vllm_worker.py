"""Methods mixed into vLLM's worker (``LLM(worker_extension_cls=...)``) for streamed weight updates.

Why a worker extension instead of ``collective_rpc("reload_weights")``: weight sync
arrives in buckets, and vLLM's in-place reload must see *every* tensor between one
``initialize_layerwise_reload`` and one ``finalize_layerwise_reload`` (a layer is
re-processed -- e.g. repacked for oneDNN on CPU -- once all its tensors have arrived).
Splitting begin / load-bucket / finish lets buckets stream in with at most one bucket
buffered, and lets us check at the end that every engine parameter was loaded (vLLM's
own reload only logs a warning and silently keeps stale weights).

Method names carry a ``dm_`` prefix so they never clash with worker methods.
"""

from __future__ import annotations

import torch

from dapo_megatron.weight_sync.engine_layout import engine_slices
from dapo_megatron.weight_sync.verify import engine_checksums

__all__ = ["DapoWorkerExtension"]


class DapoWorkerExtension:
    """Mixed into the vLLM worker class; ``self`` is the worker (has ``model_runner``, ``vllm_config``)."""

    def _dm_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def dm_begin_reload(self) -> None:
        # optional dependency: vLLM (this module is also imported without it)
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        model = self._dm_model()
        # remove_duplicate=False: a tied LM head shares the embedding's Parameter, and the
        # default de-duplication would hide it from the "was everything loaded" check
        self._dm_expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        self._dm_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            initialize_layerwise_reload(model)

    def dm_load_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        # optional dependency: vLLM (this module is also imported without it)
        from vllm.config import set_current_vllm_config

        if not hasattr(self, "_dm_loaded"):
            raise RuntimeError("dm_load_bucket called without dm_begin_reload")
        model = self._dm_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            loaded = model.load_weights(weights=iter(named_tensors))
        if loaded is not None:
            self._dm_loaded |= set(loaded)
        return len(named_tensors)

    def dm_finish_reload(self) -> None:
        # optional dependency: vLLM (this module is also imported without it)
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if not hasattr(self, "_dm_loaded"):
            raise RuntimeError("dm_finish_reload called without dm_begin_reload")
        model = self._dm_model()
        missing = sorted(self._dm_expected - self._dm_loaded)
        del self._dm_loaded
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        if missing:
            raise RuntimeError(
                f"weight update did not provide {len(missing)} engine parameter(s): {missing[:10]}"
                + (" ..." if len(missing) > 10 else "")
            )

    def dm_weight_slices(self) -> dict:
        return engine_slices(self._dm_model())

    def dm_checksums(self) -> dict:
        return engine_checksums(self._dm_model())
