"""Decoupled cross-attention math (host-free).

For one attn2 layer: out = to_out(A_text + weight * A_quality), where
A_quality = softmax(Q K_ip^T / sqrt(d)) V_ip with the layer's own Q and head split, K_ip = tokens @ W'_k^T,
V_ip = tokens @ W'_v^T. The host glue computes A_text itself and adds `weight * ip_attention(...)`
before the output projection; `decoupled_output` is that sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, width = x.shape
    if width % heads:
        raise ValueError(f"attention: width {width} is not divisible by {heads} heads")
    return x.reshape(b, t, heads, width // heads).transpose(1, 2)  # (B, heads, T, d)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, Tq, heads*d), (B, Tk, heads*d) x2 -> (B, Tq, heads*d); SDPA with its default 1/sqrt(d) scale."""
    b, tq, width = q.shape
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                                         attn_mask=mask)
    return out.transpose(1, 2).reshape(b, tq, width)


def ip_attention(q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of the layer's queries to the quality tokens' keys/values (no mask).

    `k_ip`/`v_ip` are (1 or B, N, heads*d): batch 1 is shared by every row of `q`. They are cast to
    q's device and dtype here, so the caller may keep one fp32 CPU copy.
    """
    b = q.shape[0]
    if k_ip.shape != v_ip.shape:
        raise ValueError(f"ip_attention: k_ip {list(k_ip.shape)} and v_ip {list(v_ip.shape)} differ")
    if k_ip.shape[-1] != q.shape[-1]:
        raise ValueError(f"ip_attention: token width {k_ip.shape[-1]} != query width {q.shape[-1]} "
                         "(adapter layer does not match this model layer)")
    if k_ip.shape[0] not in (1, b):
        raise ValueError(f"ip_attention: quality-token batch {k_ip.shape[0]} must be 1 or the query batch {b}")
    k_ip = k_ip.to(device=q.device, dtype=q.dtype)
    v_ip = v_ip.to(device=q.device, dtype=q.dtype)
    if k_ip.shape[0] != b:
        k_ip, v_ip = k_ip.expand(b, -1, -1), v_ip.expand(b, -1, -1)
    return attention(q, k_ip, v_ip, heads)


def decoupled_output(text_out: torch.Tensor, ip_out: torch.Tensor, weight: float) -> torch.Tensor:
    """What goes into to_out: text attention + weight * quality attention."""
    return text_out + weight * ip_out


@torch.no_grad()
def precompute_ip_kv(adapter, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values of the quality tokens (B, N, C) for every layer k: [(K_k, V_k)] each (B, N, hidden_k), fp32."""
    tokens = torch.as_tensor(tokens).to(torch.float32)
    c = adapter.info.cross_attention_dim
    if tokens.dim() != 3 or tokens.shape[-1] != c:
        raise ValueError(f"precompute_ip_kv: tokens must be (B, N, {c}), got {list(tokens.shape)}")
    return [(tokens @ wk.to(tokens.device).T, tokens @ wv.to(tokens.device).T)
            for wk, wv in zip(adapter.to_k_ip, adapter.to_v_ip)]
