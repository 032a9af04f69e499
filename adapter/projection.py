"""The adapter's projection module (`image_proj`) and the quality tokens it produces.

linear: Linear(D_in -> N*C) -> reshape (B, N, C) -> LayerNorm(C)
mlp:    Linear(D_in -> H) -> GELU (exact erf) -> Linear(H -> N*C) -> reshape -> LayerNorm(C)
LayerNorm is PyTorch's default (eps 1e-5, affine), per token over C.

Unconditional tokens are projection(0), not zeros (the biases make them a learned "no quality"
embedding); with negative guidance they are projection(-k * v), v the complete input vector.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import tensor_files
from .checkpoint import AdapterInfo
from .errors import InputError, quote

TOKENS_FORMAT = "iqa_adapter_quality_tokens"
TOKENS_VERSION = "1"

# What one set of quality tokens may make the server hold: the tokens and, once applied, their keys/values
# in every cross-attention layer (cond + uncond). Rows beyond the host's latent batch cap can never be sampled.
TOKEN_MEMORY_BUDGET = 256 * 1024 ** 2
# LayerNorm outputs are about |gamma| * sqrt(C) + |beta|: real tokens are far below this; values above it
# overflow the model's half-precision attention (NaN, black images).
TOKEN_VALUE_LIMIT = 1.0e4
# |input vector| entries: z-scores of real images lie within about +-6, IQA activations far below this;
# larger values collapse the tokens (LayerNorm of a huge vector) or overflow fp32.
INPUT_VALUE_LIMIT = 1.0e6
MAX_TOKENS_PER_ROW = 1024
MAX_TOKEN_WIDTH = 16384


def row_bytes(num_tokens: int, cross_attention_dim: int, layer_widths=()) -> int:
    """Bytes one token row costs: cond + uncond tokens, and their keys/values in every layer (fp32)."""
    return 2 * 4 * int(num_tokens) * (int(cross_attention_dim) + 2 * sum(int(w) for w in layer_widths))


def max_token_rows(num_tokens: int, cross_attention_dim: int, layer_widths=(), host_batch_cap: int = 4096) -> int:
    """Most rows (targets / reference images / sweep steps) one set of tokens may hold for this architecture."""
    by_memory = TOKEN_MEMORY_BUDGET // max(1, row_bytes(num_tokens, cross_attention_dim, layer_widths))
    return max(1, min(int(host_batch_cap), by_memory))


def max_rows_for(info: AdapterInfo, host_batch_cap: int = 4096) -> int:
    return max_token_rows(info.num_tokens, info.cross_attention_dim, info.layer_widths, host_batch_cap)


def check_row_count(rows: int, limit: int, what: str = "rows", input_name: str | None = None) -> None:
    if rows < 1:
        raise InputError(f"no {what}: at least one is needed", input_name)
    if rows > limit:
        raise InputError(f"{rows} {what}, but at most {limit} fit this adapter (the host's latent batch cap and "
                         f"{TOKEN_MEMORY_BUDGET // 1024 ** 2} MiB of quality tokens); use fewer", input_name)


def check_token_values(cond: torch.Tensor, uncond: torch.Tensor, input_name: str | None = None) -> None:
    """Every token path (encode, sweep, reference, load): finite values of a sane size, at least one row."""
    if cond.shape[0] < 1:
        raise InputError("the quality tokens hold no rows (at least one target is needed)", input_name)
    for name, tensor in (("cond", cond), ("uncond", uncond)):
        if tensor.numel() == 0:
            continue
        low, high = (float(x) for x in torch.aminmax(tensor.detach().float()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InputError(f"the {name} quality tokens contain NaN or infinite values (the image would be black); "
                             "use moderate target values", input_name)
        if max(-low, high) > TOKEN_VALUE_LIMIT:
            raise InputError(f"the {name} quality tokens reach {max(-low, high):.3g}, beyond {TOKEN_VALUE_LIMIT:g} "
                             "(overflows the model's attention: black images); use moderate target values", input_name)


class QualityProjection(nn.Module):
    def __init__(self, input_dim: int, cross_attention_dim: int, num_tokens: int, kind: str = "linear",
                 mlp_hidden_dim: int = 128):
        super().__init__()
        self.input_dim, self.cross_attention_dim = input_dim, cross_attention_dim
        self.num_tokens, self.kind = num_tokens, kind
        out = num_tokens * cross_attention_dim
        if kind == "linear":
            self.proj = nn.Linear(input_dim, out)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(input_dim, mlp_hidden_dim), nn.GELU(), nn.Linear(mlp_hidden_dim, out))
        else:
            raise ValueError(f"projection kind must be 'linear' or 'mlp', got {kind!r}")
        self.norm = nn.LayerNorm(cross_attention_dim, eps=1e-5)

    @classmethod
    def from_weights(
        cls, image_proj: dict[str, torch.Tensor], info: AdapterInfo, source: str = "<weights>"
    ) -> QualityProjection:
        """Build from `image_proj.*` tensors (prefix stripped), loaded strictly; fp32, CPU, eval mode."""
        module = cls(info.input_dim, info.cross_attention_dim, info.num_tokens, info.projection_kind,
                     info.mlp_hidden_dim or 128)
        try:
            module.load_state_dict({k: v.to(torch.float32) for k, v in image_proj.items()}, strict=True)
        except RuntimeError as error:
            raise ValueError(f"IQA-Adapter {source}: image_proj weights do not fit a {info.projection_kind} "
                             f"projection: {error}") from None
        return module.to(device="cpu", dtype=torch.float32).eval().requires_grad_(False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D_in) -> (B, N, C)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(f"IQA-Adapter projection: expected input (B, {self.input_dim}), got {list(vectors.shape)}")
        out = self.proj(vectors.to(self.norm.weight.dtype)).reshape(vectors.shape[0], self.num_tokens,
                                                                     self.cross_attention_dim)
        # LayerNorm needs the variance of each token: beyond fp32's range the tokens become NaN or collapse
        # to the norm's bias whatever the target (silent black or target-blind images).
        if out.numel() and not (torch.isfinite(out).all() and torch.isfinite(out.float().var(dim=-1)).all()):
            raise InputError("the quality vector is too large: the tokens overflow (NaN or collapsed tokens); "
                             "use moderate target values")
        return self.norm(out)


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
        check_token_values(self.cond, self.uncond)

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def select(self, index: int) -> QualityTokens:
        return QualityTokens(self.cond[index:index + 1], self.uncond[index:index + 1], [self.labels[index]],
                             self.cross_attention_dim, self.num_tokens)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        metadata = {"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "num_tokens": str(self.num_tokens),
                    "cross_attention_dim": str(self.cross_attention_dim), "labels": json.dumps(self.labels)}
        save_file({"cond": self.cond.detach().to("cpu", torch.float32).contiguous(),
                   "uncond": self.uncond.detach().to("cpu", torch.float32).contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, host_batch_cap: int = 4096) -> QualityTokens:
        """Read a tokens file; shapes and metadata are checked from the header before any tensor is read."""
        path = pathlib.Path(path)
        if not path.is_file() or path.stat().st_size == 0:
            raise InputError(f"quality tokens file {path.name[:200]}: missing or empty")
        found = {}

        def check(entries, metadata):
            if set(entries) != {"cond", "uncond"} or metadata.get("format") != TOKENS_FORMAT:
                raise InputError(f"not a QualityTokens file (keys {quote(sorted(entries))}, format "
                                 f"{quote(metadata.get('format'))}); save one with IQA-Adapter Save Tokens")
            cond, uncond = entries["cond"], entries["uncond"]
            if cond.dtype not in tensor_files.FLOAT_DTYPES or uncond.dtype not in tensor_files.FLOAT_DTYPES:
                raise InputError(f"tensors must be floating point, got {cond.dtype} and {uncond.dtype}")
            if len(cond.shape) != 3 or cond.shape != uncond.shape:
                raise InputError(f"cond and uncond must both be (rows, N, C), got {list(cond.shape)} and "
                                 f"{list(uncond.shape)}")
            rows, n, c = cond.shape
            try:
                num_tokens, dim = int(metadata["num_tokens"]), int(metadata["cross_attention_dim"])
            except (KeyError, ValueError):
                raise InputError("metadata num_tokens / cross_attention_dim missing or not integers") from None
            if (n, c) != (num_tokens, dim) or not (1 <= n <= MAX_TOKENS_PER_ROW and 1 <= c <= MAX_TOKEN_WIDTH):
                raise InputError(f"tensors are (rows, {n}, {c}) but the metadata says N={num_tokens}, C={dim}")
            check_row_count(rows, max_token_rows(n, c, (), host_batch_cap), "token rows")
            found.update(num_tokens=num_tokens, dim=dim)

        try:
            tensors, metadata = tensor_files.read_safetensors(path, check)
        except tensor_files.TensorFileError as error:
            raise InputError(f"quality tokens file {path.name[:200]}: {error.reason}") from None
        except InputError as error:
            raise InputError(f"quality tokens file {path.name[:200]}: {error}") from None
        try:
            labels = json.loads(metadata.get("labels", "[]"))
        except (ValueError, RecursionError):
            raise InputError(f"quality tokens file {path.name[:200]}: the labels metadata is not valid JSON") from None
        rows = tensors["cond"].shape[0]
        if not isinstance(labels, list) or not all(isinstance(label, dict) for label in labels) \
                or len(labels) not in (0, rows):
            labels = []  # labels only describe the rows for reports: unusable ones are dropped, not fatal
        try:
            return cls(tensors["cond"].to(torch.float32), tensors["uncond"].to(torch.float32), labels,
                       found["dim"], found["num_tokens"])
        except InputError as error:
            raise InputError(f"quality tokens file {path.name[:200]}: {error}") from None
