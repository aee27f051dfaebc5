"""The Llama-family forward (Llama, Mistral, Qwen2) over one flattened token batch.

Every decoder linear is a base module from quant.make_linear (NF4 or dense) plus, per target module,
a LoRA slice from the device slot cache, applied for all adapters of the batch by kernels.lora_project
(the base output, then lora_apply; the LoRA shrink beside the base matmul in CUDA graphs, or, on steps of a
few tokens, inside the norm or SiLU*mul kernel that writes the projection's input: kernels.lora_fused).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hotlora.kernels.elementwise import add_rms_norm, rope_kv_, silu_mul
from hotlora.kernels.lora import LoraMeta, LoraSlice, lora_project, shrink_in_producer
from hotlora.kernels.lora_fused import norm_shrink, silu_mul_shrink
from hotlora.kernels.nf4 import Finish
from hotlora.server.model.attention import AttentionMeta, paged_attention
from hotlora.server.model.config import ModelConfig
from hotlora.server.model.quant import fuse_nf4, make_linear
from hotlora.server.model.rope import Rotary

# The projections LoRA may target, grouped as they are applied: one LoRA shrink + expand per group.
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
_WEIGHTS = {f"self_attn.{n}.weight" for n in (*QKV, "o_proj")} | {
    f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")
} | {"input_layernorm.weight", "post_attention_layernorm.weight"}
_LAYER_KEYS = {False: _WEIGHTS, True: _WEIGHTS | {f"self_attn.{n}.bias" for n in QKV}}


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    attn: AttentionMeta
    lora: LoraMeta | None  # None when no token of the batch has an adapter
    sample_idx: torch.Tensor  # int64 [S]: tokens whose logits are needed


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], quant: str) -> None:
        self.cfg = cfg
        self.input_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]
        self.proj = {}
        for name in (*QKV, "o_proj"):
            self.proj[name] = make_linear(w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"), quant)
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.proj[name] = make_linear(w[f"mlp.{name}.weight"], None, quant)
        # q/k/v and gate/up as one weight each where the fused NF4 kernel serves them (CUDA)
        self.groups = {names: g for names in (QKV, GATE_UP) if (g := fuse_nf4([self.proj[n] for n in names]))}
        self.lora: dict[str, LoraSlice] = {}  # filled by the adapter slot cache
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _slices(self, names: tuple[str, ...]) -> list[LoraSlice]:
        """The LoRA slices of the projection group `names`, in its order."""
        return [self.lora[n] for n in names]

    def _project(self, names: tuple[str, ...], x: torch.Tensor, lora: LoraMeta | None,
                 shrunk: bool = False) -> list[torch.Tensor]:  # fmt: skip
        group = self.groups.get(names)

        def base(finish: Finish | None = None) -> list[torch.Tensor]:
            return group(x, finish) if group is not None else [self.proj[n](x, finish) for n in names]

        if lora is None:
            return base()
        return lora_project(base, x, self._slices(names), lora, shrunk)

    def _norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, names: tuple[str, ...],
              lora: LoraMeta | None, shrunk: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the residual stream, its norm): h += delta in place, or out of place with the LoRA shrink of the
        group `names` in the same launch (kernels.lora_fused) when `shrunk`."""
        if shrunk:
            return norm_shrink(h, delta, weight, self.cfg.rms_norm_eps, self._slices(names), lora)
        return h, add_rms_norm(h, delta, weight, self.cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, batch: ForwardBatch,
                rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the previous layer's output `delta` into the residual stream h and returns (the residual stream,
        this layer's MLP output), which the next layer (or the final norm) adds in turn: each residual add is
        fused into the norm that follows it. On small LoRA steps (kernels.lora.shrink_in_producer) the norms
        and SiLU*mul also run the next projection's LoRA shrink, and the residual stream is a new tensor."""
        cfg = self.cfg
        lora = batch.lora if self.lora else None
        fused = shrink_in_producer(h, lora)
        h, x = self._norm(h, delta, self.input_norm, QKV, lora, fused)
        q, k, v = self._project(QKV, x, lora, fused)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        rope_kv_(q, k, v, batch.positions, rotary.cos, rotary.sin, self.k_cache, self.v_cache,
                 batch.attn.slot_mapping)
        o = paged_attention(q, self.k_cache, self.v_cache, batch.attn, cfg.head_dim**-0.5, cfg.sliding_window)
        (o,) = self._project(("o_proj",), o.reshape(o.shape[0], -1), lora)
        h, x = self._norm(h, o, self.post_norm, GATE_UP, lora, fused)
        gate, up = self._project(GATE_UP, x, lora, fused)
        act = silu_mul_shrink(gate, up, self._slices(("down_proj",)), lora) if fused else silu_mul(gate, up)
        (down,) = self._project(("down_proj",), act, lora, fused)
        return h, down


class LlamaModel:
    def __init__(self, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], quant: str,
                 max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device, self.dtype = device, dtype
        top: dict[str, torch.Tensor] = {}
        pending: dict[int, dict[str, torch.Tensor]] = {}
        built: dict[int, DecoderLayer] = {}
        for name, t in tensors:
            if not name.startswith("model.layers."):
                top[name] = t
                continue
            index, key = name[len("model.layers."):].split(".", 1)
            layer = pending.setdefault(int(index), {})
            layer[key] = t
            if _LAYER_KEYS[cfg.attention_bias] <= layer.keys():  # complete: build (and quantize) it now
                built[int(index)] = DecoderLayer(cfg, pending.pop(int(index)), quant)
        if sorted(built) != list(range(cfg.num_layers)):
            raise ValueError(f"checkpoint has layers {sorted(built)}, config says {cfg.num_layers}")
        self.layers = [built[i] for i in range(cfg.num_layers)]
        self.embed = top["model.embed_tokens.weight"]
        self.norm = top["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else top["lm_head.weight"]
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_len, device, dtype)
        # CPU: intra-op threads for the lm_head when a step runs its layers on fewer (the runner's small steps
        # run on one); the [tokens, vocab] product is the one op of such a step large enough to share
        self.head_threads = 0

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [S, vocab] (float32) at batch.sample_idx."""
        h = F.embedding(batch.input_ids, self.embed)
        delta = None
        for layer in self.layers:
            h, delta = layer.forward(h, delta, batch, self.rotary)
        idx = batch.sample_idx
        h = add_rms_norm(h[idx], delta[idx], self.norm, self.cfg.rms_norm_eps)
        threads = torch.get_num_threads()
        if self.head_threads > threads:  # see head_threads
            torch.set_num_threads(self.head_threads)
        try:
            return (h @ self.lm_head.T).float()
        finally:
            if self.head_threads > threads:
                torch.set_num_threads(threads)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        """Per layer K and V caches [num_blocks, block_size, KVH, Dh] of `dtype` (the model's, or
        torch.float8_e4m3fn: see kernels.elementwise.rope_kv_)."""
        shape = (num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        for layer in self.layers:
            layer.k_cache = torch.zeros(shape, device=self.device, dtype=dtype)
            layer.v_cache = torch.zeros(shape, device=self.device, dtype=dtype)
