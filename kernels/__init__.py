"""hotlora.kernels: Triton kernels, each with a torch reference in ``reference.py`` (torch/triton only).

- ``lora``: batched multi-adapter LoRA (shrink + expand over a row pool of adapter weights); ``lora_fused``: the
  shrink inside the residual + RMSNorm and SiLU*mul kernels that write a projection's input (single-token steps).
- ``nf4``: the NF4 dequant-GEMM; ``elementwise``: fused residual + RMSNorm, SiLU*mul, rope + KV-cache write.
- ``attention``: paged varlen attention (decode rows and prefill chunks in one launch, GQA, sliding window,
  split-KV).
"""
