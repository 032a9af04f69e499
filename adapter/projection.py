"""The adapter's projection module (`image_proj`) and the quality tokens it produces.

linear: Linear(D_in -> N*C) -> reshape (B, N, C) -> LayerNorm(C)
mlp:    Linear(D_in -> H) -> GELU (exact erf) -> Linear(H -> N*C) -> reshape -> LayerNorm(C)
LayerNorm is PyTorch's default (eps 1e-5, affine), per token over C.

Unconditional tokens are projection(0), not zeros (the biases make them a learned "no quality"
embedding); with negative guidance they are projection(-k * v), v the complete input vector.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .checkpoint import AdapterInfo, IQAAdapter

TOKENS_FORMAT = "iqa_adapter_quality_tokens"
TOKENS_VERSION = "1"


class QualityProjection(nn.Module):
    def __init__(self, input_dim: int, cross_attention_dim: int, num_tokens: int, kind: str = "linear",
                 mlp_hidden_dim: int = 128):
        super().__init__()
        self.input_dim, self.cross_attention_dim, self.num_tokens, self.kind = input_dim, cross_attention_dim, num_tokens, kind
        out = num_tokens * cross_attention_dim
        if kind == "linear":
            self.proj = nn.Linear(input_dim, out)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(input_dim, mlp_hidden_dim), nn.GELU(), nn.Linear(mlp_hidden_dim, out))
        else:
            raise ValueError(f"projection kind must be 'linear' or 'mlp', got {kind!r}")
        self.norm = nn.LayerNorm(cross_attention_dim, eps=1e-5)

    @classmethod
    def from_weights(cls, image_proj: dict[str, torch.Tensor], info: "AdapterInfo", source: str = "<weights>") -> "QualityProjection":
        """Build from `image_proj.*` tensors (prefix stripped), loaded strictly; fp32, CPU, eval mode."""
        module = cls(info.input_dim, info.cross_attention_dim, info.num_tokens, info.projection_kind,
                     info.mlp_hidden_dim or 128)
        try:
            module.load_state_dict({k: v.to(torch.float32) for k, v in image_proj.items()}, strict=True)
        except RuntimeError as error:
            raise ValueError(f"IQA-Adapter {source}: image_proj weights do not fit a {info.projection_kind} projection: {error}") from None
        return module.to(device="cpu", dtype=torch.float32).eval().requires_grad_(False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D_in) -> (B, N, C)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(f"IQA-Adapter projection: expected input (B, {self.input_dim}), got {list(vectors.shape)}")
        out = self.proj(vectors.to(self.norm.weight.dtype))
        return self.norm(out.reshape(vectors.shape[0], self.num_tokens, self.cross_attention_dim))


@dataclass
class QualityTokens:
    """The ComfyUI `QUALITY_TOKENS` object: one row per target, fp32 CPU."""
    cond: torch.Tensor  # (B, N, C)
    uncond: torch.Tensor  # (B, N, C)
    labels: list[dict] = field(default_factory=list)  # per row: what the target was (for reports)
    cross_attention_dim: int = 0
    num_tokens: int = 0

    def __post_init__(self):
        if self.cond.dim() != 3 or self.cond.shape != self.uncond.shape:
            raise ValueError(f"QualityTokens: cond and uncond must both be (B, N, C), got {list(self.cond.shape)} "
                             f"and {list(self.uncond.shape)}")
        b, n, c = self.cond.shape
        self.num_tokens = self.num_tokens or n
        self.cross_attention_dim = self.cross_attention_dim or c
        if (n, c) != (self.num_tokens, self.cross_attention_dim):
            raise ValueError(f"QualityTokens: tensors are (B, {n}, {c}) but num_tokens={self.num_tokens}, "
                             f"cross_attention_dim={self.cross_attention_dim}")
        if not self.labels:
            self.labels = [{} for _ in range(b)]
        if len(self.labels) != b:
            raise ValueError(f"QualityTokens: {len(self.labels)} labels for {b} rows")

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def select(self, index: int) -> "QualityTokens":
        return QualityTokens(self.cond[index:index + 1], self.uncond[index:index + 1], [self.labels[index]],
                             self.cross_attention_dim, self.num_tokens)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        metadata = {"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "num_tokens": str(self.num_tokens),
                    "cross_attention_dim": str(self.cross_attention_dim), "labels": json.dumps(self.labels)}
        save_file({"cond": self.cond.detach().to("cpu", torch.float32).contiguous(),
                   "uncond": self.uncond.detach().to("cpu", torch.float32).contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QualityTokens":
        from safetensors import safe_open

        path = pathlib.Path(path)
        if not path.is_file() or path.stat().st_size == 0:
            raise ValueError(f"quality tokens file {path}: missing or empty")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                keys = set(handle.keys())
                if keys != {"cond", "uncond"} or metadata.get("format") != TOKENS_FORMAT:
                    raise ValueError(f"quality tokens file {path}: not a QualityTokens file (keys {sorted(keys)}, "
                                     f"format {metadata.get('format')!r}); save one with IQA-Adapter Save Tokens")
                cond, uncond = handle.get_tensor("cond"), handle.get_tensor("uncond")
            labels = json.loads(metadata.get("labels", "[]"))
            num_tokens, dim = int(metadata["num_tokens"]), int(metadata["cross_attention_dim"])
        except ValueError:
            raise
        except Exception as error:  # corrupt header / truncated data
            raise ValueError(f"quality tokens file {path}: cannot read it ({type(error).__name__}: {error})") from None
        if not (cond.is_floating_point() and torch.isfinite(cond).all() and torch.isfinite(uncond).all()):
            raise ValueError(f"quality tokens file {path}: tensors must be finite floating-point values")
        return cls(cond.to(torch.float32), uncond.to(torch.float32), labels, dim, num_tokens)


@torch.no_grad()
def encode_tokens(adapter: "IQAAdapter", vectors: torch.Tensor, negative_scale: float = 0.0,
                  labels: list[dict] | None = None) -> QualityTokens:
    """cond = proj(v); uncond = proj(-k * v) (k = negative_scale; k = 0 gives proj(0), the default)."""
    vectors = torch.as_tensor(vectors, dtype=torch.float32)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if not torch.isfinite(vectors).all():
        raise ValueError("IQA-Adapter encode: the quality vector contains NaN or infinite values")
    if not (negative_scale == negative_scale) or abs(negative_scale) == float("inf"):
        raise ValueError(f"IQA-Adapter encode: negative_scale must be finite, got {negative_scale}")
    projection = adapter.projection
    cond = projection(vectors)
    uncond = projection(-float(negative_scale) * vectors) if negative_scale else projection(torch.zeros_like(vectors))
    return QualityTokens(cond.float().cpu(), uncond.float().cpu(), labels or [], adapter.info.cross_attention_dim,
                         adapter.info.num_tokens)
