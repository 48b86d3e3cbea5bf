"""Mapping networks: a CLIP embedding (b, d) -> an LM prefix (b, L, h).

Notation: b - batch, d - embedding dim, L - prefix length, h - LM hidden size, c - clip tokens.
"""

from __future__ import annotations

import torch
from torch import nn


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
    """ClipCap's transformer mapper (CapDec's default).

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
        b = x.shape[0]
        clip_tokens = self.linear(x).view(b, self.clip_length, self.hidden)  # (b, c, h)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1)  # (b, L, h)
        out = self.transformer(torch.cat([clip_tokens, const], dim=1))  # (b, c+L, h)
        return out[:, self.clip_length:]  # (b, L, h)


class RetrievalFusion(nn.Module):
    """IFCap-style fusion: the query embedding attends over its k retrieved caption embeddings.

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
