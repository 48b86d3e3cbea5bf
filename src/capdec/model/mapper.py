"""Mapping networks: a CLIP embedding (b, d) -> an LM prefix (b, L, h).

Two transformer mappers exist:

- :class:`ClipCapTransformerMapper` is ClipCap's / CapDec's exactly (``TransformerMapper`` in
  rmokady/CLIP_prefix_caption and DavidHuji/CapDec ``train.py``): pre-norm layers, multi-head attention
  whose query and key/value projections have no bias and whose output projection has one, a ReLU MLP of
  ratio 2. Its parameter names follow the reference, so released weights load by renaming only the
  ``clip_project.`` prefix (see ``capdec.clipcap``). The default for new models (``mapper_variant="clipcap"``).
- :class:`TransformerMapper` is the mapper capdec used before (``torch.nn.TransformerEncoder`` with GELU
  and biased q/k/v), kept so that checkpoints written with it (``mapper_variant="legacy"``, the value
  of a config that predates the field) load and decode exactly as before.

Notation: b - batch, d - embedding dim, L - prefix length, h - LM hidden size, c - clip tokens,
n - sequence (c + L), H - heads, e - head dim (h / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capdec.configs import MAPPER_VARIANTS  # noqa: F401  (re-exported)


class MLPMapper(nn.Module):
    """ClipCap's MLP: d -> (h·L)/2 -> h·L with tanh."""

    def __init__(self, *, dim: int, hidden: int, prefix_length: int):
        super().__init__()
        self.prefix_length, self.hidden = prefix_length, hidden
        inner = max(1, hidden * prefix_length // 2)
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.Tanh(), nn.Linear(inner, hidden * prefix_length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.hidden)  # (b, L, h)


class TransformerMapper(nn.Module):
    """capdec's earlier transformer mapper (``mapper_variant="legacy"``): ClipCap's layout with GELU and
    biased q/k/v projections (``nn.TransformerEncoder``). Kept for checkpoints that use it.

    The embedding is mapped linearly to c "clip tokens"; L learned constants are appended; a small
    transformer encoder mixes them and the last L outputs are the prefix.
    """

    def __init__(self, *, dim: int, hidden: int, prefix_length: int, clip_length: int, depth: int = 8,
                 heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.prefix_length, self.clip_length, self.hidden = prefix_length, clip_length, hidden
        self.linear = nn.Linear(dim, clip_length * hidden)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_clip_tokens(self.clip_tokens(x))

    def clip_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(b, d) -> (b, c, h): the embedding mapped linearly to c "clip tokens"."""
        return self.linear(x).view(x.shape[0], self.clip_length, self.hidden)

    def from_clip_tokens(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(b, c, h) clip tokens -> (b, L, h) prefix: L learned constants appended, the transformer, the last L."""
        const = self.prefix_const.unsqueeze(0).expand(clip_tokens.shape[0], -1, -1)  # (b, L, h)
        out = self.transformer(torch.cat([clip_tokens, const], dim=1))  # (b, c+L, h)
        return out[:, self.clip_length:]  # (b, L, h)


class ClipCapAttention(nn.Module):
    """ClipCap's ``MultiHeadAttention``: no bias on ``to_queries`` / ``to_keys_values``, a biased output
    ``project``, softmax over the keys. Self-attention, or cross-attention over ``context`` (IFCap's fusion)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, h = x.shape
        m = context.shape[1]
        q = self.to_queries(x).view(b, n, self.heads, h // self.heads)  # (b, n, H, e)
        kv = self.to_keys_values(context).view(b, m, 2, self.heads, h // self.heads)  # (b, m, 2, H, e): keys first
        k, v = kv[:, :, 0], kv[:, :, 1]  # (b, m, H, e) each
        att = torch.einsum("bnhe,bmhe->bnmh", q, k) * self.scale  # (b, n, m, H)
        att = att.softmax(dim=2)  # over the keys
        out = torch.einsum("bnmh,bmhe->bnhe", att, v).reshape(b, n, h)  # (b, n, h)
        return self.project(out)


class ClipCapMLP(nn.Module):
    """ClipCap's ``MlpTransformer``: fc1 -> ReLU -> fc2."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ClipCapLayer(nn.Module):
    """ClipCap's pre-norm ``TransformerLayer``: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClipCapAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ClipCapMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipCapTransformer(nn.Module):
    """ClipCap's ``Transformer`` (encoder-only): ``layers`` applied in order."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.layers = nn.ModuleList([ClipCapLayer(dim, heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipCapTransformerMapper(nn.Module):
    """ClipCap's / CapDec's ``TransformerMapper``: linear to c clip tokens, L learned constants
    appended, the transformer, the last L outputs.

    Parameter names are the reference's (``linear``, ``prefix_const``, ``transformer.layers.N.{norm1,
    attn.to_queries, attn.to_keys_values, attn.project, norm2, mlp.fc1, mlp.fc2}``).
    """

    def __init__(self, *, dim: int, hidden: int, prefix_length: int, clip_length: int, depth: int = 8,
                 heads: int = 8):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the LM hidden size {hidden} is not divisible by {heads} mapper heads")
        self.prefix_length, self.clip_length, self.hidden = prefix_length, clip_length, hidden
        self.linear = nn.Linear(dim, clip_length * hidden)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden))
        self.transformer = ClipCapTransformer(hidden, heads, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_clip_tokens(self.clip_tokens(x))

    def clip_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(b, d) -> (b, c, h): the embedding mapped linearly to c "clip tokens"."""
        return self.linear(x).view(x.shape[0], self.clip_length, self.hidden)

    def from_clip_tokens(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(b, c, h) clip tokens -> (b, L, h) prefix: L learned constants appended, the transformer, the last L."""
        const = self.prefix_const.unsqueeze(0).expand(clip_tokens.shape[0], -1, -1)  # (b, L, h)
        out = self.transformer(torch.cat([clip_tokens, const], dim=1))  # (b, c+L, h)
        return out[:, self.clip_length:]  # (b, L, h)


class IFCapFusion(nn.Module):
    """IFCap's Fusion Module: the query's clip tokens attend over its k retrieved captions.

    The retrieved caption embeddings (b, k, d) are mapped linearly to the LM's size (``rt_linear``); one
    pre-norm transformer layer with ClipCap's attention (no bias on q/kv) and a ReLU MLP of ratio 2 lets the
    mapper's c clip tokens (the queries; b, c, h) cross-attend over them (keys and values, not normalised),
    with residuals. Its output replaces the clip tokens before the mapper's transformer (IFCap's
    ``MappingNetwork`` with ``att_gt_n_rt``), so it needs the transformer mapper.
    """

    def __init__(self, *, dim: int, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the LM hidden size {hidden} is not divisible by {heads} fusion heads")
        self.rt_linear = nn.Linear(dim, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = ClipCapAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = ClipCapMLP(hidden, 2 * hidden)

    def forward(self, clip_tokens: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        context = self.rt_linear(retrieved)  # (b, k, h)
        x = clip_tokens + self.attn(self.norm1(clip_tokens), context)  # (b, c, h)
        return x + self.mlp(self.norm2(x))


class RetrievalFusion(nn.Module):
    """capdec's earlier fusion (``retrieval_fusion="embedding"``): the query embedding attends over its k
    retrieved caption embeddings in CLIP space, before the mapper.

    (b, d) query + (b, k, d) retrieved -> (b, d), residual, so an untrained fusion starts near the query.
    """

    def __init__(self, *, dim: int, heads: int = 8):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(q.unsqueeze(1), retrieved, retrieved, need_weights=False)  # (b, 1, d)
        return self.norm(q + out.squeeze(1))  # (b, d)
