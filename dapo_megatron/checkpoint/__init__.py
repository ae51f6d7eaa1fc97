"""Every checkpoint file this project reads or writes: torch_dist training checkpoints and
their manifests, the torch_dist files the converter streams, and HF safetensors directories.

Why one package: the formats are shared by training, conversion and export, and one owner
per format keeps one reader and one writer of each.  Submodules are imported by path; this
file imports nothing, so importing one format does not pull in megatron.
"""
