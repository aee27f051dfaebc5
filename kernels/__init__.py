"""hotlora.kernels: Triton kernels, each with a torch reference in ``reference.py`` (torch/triton only).

- ``lora``: batched multi-adapter LoRA (shrink + expand over a row pool of adapter weights).
"""
