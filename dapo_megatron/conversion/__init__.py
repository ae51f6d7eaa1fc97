"""HF <-> Megatron (torch_dist) checkpoint conversion: the library behind ``python -m dapo_megatron.convert``.

Why one process whatever ``--tp``/``--pp``: a torch_dist checkpoint stores *global*
tensors and megatron reshards on load, so the checkpoint of a TP=N x PP=M model is
the same set of global tensors as that of a TP=1 model -- except the vocabulary
padding (a multiple of ``128 * N``), which we reproduce for the target ``N``.  The
converter therefore builds the TP=1/PP=1 model on the *meta* device (no memory) and
takes megatron's own ``sharded_state_dict`` of it, so keys, stacked-layer axes and
``_extra_state`` objects are exactly what a real model asks for on load.
``--tp``/``--pp`` validate divisibility and set the padding.  Conversion never touches a
GPU, whatever the host has: a gloo group, a CPU-initialised local-spec model on meta.  The
keys are those of megatron's local layer spec; a Transformer-Engine model names the two
pre-norms ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` instead.

Both directions stream (:mod:`dapo_megatron.checkpoint.torch_dist`): ``hf-to-mcore`` plans every
chunk (one parameter of one layer) from the safetensors headers, running the mapping on
meta tensors for shapes and dtypes, and converts each chunk from the HF tensors only when
torch DCP's writer asks for it; ``mcore-to-hf`` reads one parameter of one layer at a
time and writes its bytes straight into their planned place in the safetensors shard.
Peak memory is a few times the largest tensor (``bench/convert_memory.py``), and the
export reads checkpoints written by megatron-core 0.16 and 0.19 alike.

Every input is validated before anything is written (:mod:`dapo_megatron.conversion.validation`)
and output appears atomically (:func:`dapo_megatron.checkpoint.files.staged_output_dir`).
"""
