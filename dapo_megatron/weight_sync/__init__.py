"""Per-step actor -> engine weight sync: gather, rename, bucket, push, verify.

* ``gather``: the actor as a stream of HF tensors on every rank (TP all-gather, cast; across PP stages
  only the slice each rank's engine keeps -- ``slices``, ``engine_layout``);
* ``buckets``: size-capped grouping;
* ``transport``: how a bucket reaches the engine (``ColocatedTransport``: same process);
* ``verify``: checksums read back from inside the engine vs the actor's, naming every mismatch;
* ``sync``: :func:`sync_weights` ties them together and marks the engine unusable on failure;
  :class:`EngineWeightSync` pairs it with :func:`verify_weights` for one engine (the trainer's part).
"""
