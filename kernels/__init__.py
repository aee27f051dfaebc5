"""hotlora.kernels: Triton kernels, each with a torch reference in ``reference.py`` (torch/triton only).

- ``lora``: batched multi-adapter LoRA (shrink + expand over a row pool of adapter weights).
- ``attention``: paged varlen attention (decode rows and prefill chunks in one launch, GQA, sliding window,
  split-KV).
"""
