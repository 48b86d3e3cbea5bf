"""CapDecModel: mapping network + causal LM, and the typed config that rebuilds it.

Notation: b - batch, d - embedding dim, L - prefix length, t - caption tokens, h - LM hidden size,
V - vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capdec.config import Config, option
from capdec.errors import InputError
from capdec.model.lm import (
    lm_from_config,
    load_pretrained_lm,
    load_tokenizer,
    scratch_lm_config,
    train_tokenizer,
)
from capdec.model.mapper import (
    MAPPER_VARIANTS,
    ClipCapTransformerMapper,
    MLPMapper,
    RetrievalFusion,
    TransformerMapper,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of prefix and padding positions: never a real token id


@dataclass
class ModelConfig(Config):
    """Everything needed to rebuild a CapDec decoder without the training script."""

    embed_dim: int = option(512, "d: the encoder's embedding size (taken from the stores)", cli=False)
    mapper: str = option("transformer", "mapping network: transformer (CapDec's) or mlp (ClipCap's)",
                         choices=("transformer", "mlp"))
    # a checkpoint config without this field gets "legacy" (from_dict), so old checkpoints load and decode as before
    mapper_variant: str = option("clipcap", "transformer mapper: clipcap (ClipCap's / CapDec's exact layers: ReLU, "
                                            "no q/k/v bias) or legacy (capdec's earlier GELU mapper)",
                                 choices=MAPPER_VARIANTS)
    prefix_length: int = option(10, "prefix vectors (L) given to the LM")
    clip_length: int | None = option(None, "transformer mapper clip tokens (default: prefix length)")
    mapper_depth: int = option(8, "transformer mapper layers")
    mapper_heads: int = option(8, "transformer mapper heads")
    lm: str = option("scratch", "'scratch' (a small LM trained from scratch with a corpus tokenizer) or a Hugging "
                                "Face causal LM id/directory (e.g. gpt2)")
    freeze_lm: bool = option(False, "train the mapper only (ClipCap's prefix-only variant); off: fine-tune the LM too")
    max_length: int = option(40, "caption tokens incl. end-of-sequence (longer captions are cut)")
    stop_at_period: bool = option(False, "the model never learned an end token (imported ClipCap / CapDec weights, "
                                         "see capdec.clipcap): decoding ends a caption at its first '.' by default",
                                  cli=False)
    # from-scratch LM (lm == "scratch")
    lm_dim: int = option(256, "scratch LM hidden size")
    lm_depth: int = option(4, "scratch LM layers")
    lm_heads: int = option(4, "scratch LM heads")
    vocab_size: int = option(8000, "scratch tokenizer vocabulary (an upper bound: small corpora give fewer)")
    lowercase: bool = option(True, "lowercase text for the scratch tokenizer")
    dropout: float = option(0.1, "scratch LM dropout")
    # retrieval augmentation (IFCap): needs the training captions as a memory (saved in the checkpoint)
    retrieval_k: int = option(0, "IFCap: fuse the k nearest training captions (of the noised query) with the query "
                                 "through cross-attention before the mapper (0 = off); the memory is kept in the "
                                 "checkpoint")
    entity_slots: int = option(0, "IFCap entity filtering: up to N words frequent among the retrieved captions "
                                  "become extra prefix vectors the decoder can copy (needs --retrieval-k)")
    entity_min_count: int = option(2, "a word must occur in at least this many retrieved captions to be an entity")
    lm_config: dict[str, Any] | None = option(None, "resolved transformers config (filled at build)", cli=False,
                                              repr=False)

    def __post_init__(self) -> None:
        if self.mapper not in ("mlp", "transformer"):
            raise InputError(f"mapper must be 'mlp' or 'transformer', got {self.mapper!r}")
        if self.mapper_variant not in MAPPER_VARIANTS:
            raise InputError(f"mapper_variant must be one of {', '.join(MAPPER_VARIANTS)}, got {self.mapper_variant!r}")
        for name in ("embed_dim", "prefix_length", "max_length", "mapper_depth", "lm_dim", "lm_depth"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.entity_slots and not self.retrieval_k:
            raise InputError("entity_slots needs retrieval (retrieval_k > 0): entities come from retrieved captions")
        if self.lm == "scratch" and self.lm_dim % self.lm_heads:
            raise InputError(f"lm_dim ({self.lm_dim}) must be divisible by lm_heads ({self.lm_heads})")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, strict: bool = False, where: str = "") -> ModelConfig:
        d = dict(d or {})
        if not strict:
            d.setdefault("mapper_variant", "legacy")  # written before the field existed: the GELU mapper
        return super().from_dict(d, strict=strict, where=where)


class CapDecModel(nn.Module):
    """Prefix mapper + causal LM. ``forward`` returns the caption cross-entropy."""

    def __init__(self, config: ModelConfig, lm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.lm = lm
        self.tokenizer = tokenizer
        hidden = lm.get_input_embeddings().embedding_dim
        if config.mapper == "mlp":
            self.mapper = MLPMapper(dim=config.embed_dim, hidden=hidden, prefix_length=config.prefix_length)
        elif config.mapper_variant == "clipcap":
            if hidden % config.mapper_heads:
                raise InputError(f"the LM hidden size {hidden} is not divisible by mapper_heads "
                                 f"({config.mapper_heads})")
            self.mapper = ClipCapTransformerMapper(dim=config.embed_dim, hidden=hidden,
                                                   prefix_length=config.prefix_length,
                                                   clip_length=config.clip_length or config.prefix_length,
                                                   depth=config.mapper_depth, heads=config.mapper_heads)
        else:
            self.mapper = TransformerMapper(dim=config.embed_dim, hidden=hidden, prefix_length=config.prefix_length,
                                            clip_length=config.clip_length or config.prefix_length,
                                            depth=config.mapper_depth, heads=config.mapper_heads)
        self.fusion = RetrievalFusion(dim=config.embed_dim) if config.retrieval_k else None
        self.no_entity = nn.Parameter(torch.zeros(hidden)) if config.entity_slots else None
        if config.freeze_lm:
            for p in self.lm.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> CapDecModel:
        """As ``nn.Module.train``, but a frozen LM stays in eval mode (dropout off), as ClipCap's
        ``ClipCaptionPrefix`` keeps its frozen GPT-2."""
        super().train(mode)
        if self.config.freeze_lm:
            self.lm.eval()
        return self

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """Filler for padded input positions (always masked out and ignored by the loss)."""
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else pad

    @property
    def total_prefix_length(self) -> int:
        return self.config.prefix_length + self.config.entity_slots

    def prefix(self, emb: torch.Tensor, *, retrieved: torch.Tensor | None = None,
               entity_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(b, d) embeddings -> (b, L + entity_slots, h) prefix in the LM's dtype.

        ``retrieved``: (b, k, d) embeddings of retrieved captions (when ``retrieval_k``);
        ``entity_ids``: (b, entity_slots, w) token ids of entity words, -1 padded (when ``entity_slots``).
        """
        p = next(self.mapper.parameters())
        emb = emb.to(device=p.device, dtype=p.dtype)
        if self.fusion is not None:
            if retrieved is None:
                raise InputError("this model was trained with retrieval: it needs retrieved caption embeddings "
                                 "(a memory; see capdec caption --memory)")
            emb = self.fusion(emb, retrieved.to(emb))
        out = self.mapper(emb)  # (b, L, h)
        if self.no_entity is not None:
            if entity_ids is None:
                raise InputError("this model was trained with entity prompts: it needs entity_ids")
            out = torch.cat([out, self._entity_vectors(entity_ids.to(p.device)).to(out.dtype)], dim=1)
        return out

    def _entity_vectors(self, entity_ids: torch.Tensor) -> torch.Tensor:
        """(b, m, w) word token ids (-1 = pad) -> (b, m, h): mean token embedding, or a learned 'none'."""
        valid = entity_ids >= 0  # (b, m, w)
        tok = self.lm.get_input_embeddings()(entity_ids.clamp(min=0))  # (b, m, w, h)
        count = valid.sum(-1, keepdim=True)  # (b, m, 1)
        mean = (tok * valid.unsqueeze(-1)).sum(2) / count.clamp(min=1)  # (b, m, h)
        return torch.where(count > 0, mean, self.no_entity.to(mean))

    def forward(self, emb: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                retrieved: torch.Tensor | None = None, entity_ids: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the caption tokens given the prefix of ``emb``: their mean, or ``reduction="sum"``.

        ``input_ids``/``attention_mask``: (b, t), right-padded, end-of-sequence included. Logits are
        computed for the caption positions only (the prefix positions' predictions are never scored),
        which at GPT-2's 50k vocabulary and a 40-vector prefix is most of the LM head's work.
        """
        prefix = self.prefix(emb, retrieved=retrieved, entity_ids=entity_ids)  # (b, L, h)
        b, L, _ = prefix.shape
        tokens = self.lm.get_input_embeddings()(input_ids)  # (b, t, h)
        inputs = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (b, L+t, h)
        mask = torch.cat([attention_mask.new_ones(b, L), attention_mask], dim=1)  # (b, L+t)
        logits = self._caption_logits(inputs, mask, L)  # position L-1+i predicts token i: (b, t, V)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        if reduction == "sum":
            return loss
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return loss / attention_mask.sum().clamp(min=1)

    def _caption_logits(self, inputs: torch.Tensor, mask: torch.Tensor, L: int) -> torch.Tensor:
        """(b, L+t, h) inputs -> (b, t, V) logits of the positions L-1 .. L+t-2 (those predicting caption tokens)."""
        body, head = self.lm.base_model, self.lm.get_output_embeddings()
        if body is self.lm or head is None:  # an LM without the usual body/head split: full logits, then slice
            return self.lm(inputs_embeds=inputs, attention_mask=mask).logits[:, L - 1 : -1]
        hidden = body(inputs_embeds=inputs, attention_mask=mask)[0]  # (b, L+t, h)
        return head(hidden[:, L - 1 : -1])  # (b, t, V)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Captions -> right-padded (n, t) ids with end-of-sequence appended, mask, and #captions cut."""
        ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        cap = self.config.max_length - 1
        cut = sum(len(x) > cap for x in ids)
        rows = [x[:cap] + [self.eos_token_id] for x in ids]
        t = max((len(r) for r in rows), default=1)
        input_ids = torch.full((len(rows), t), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return input_ids, mask, cut

    def decode_ids(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Token ids (without prefix) -> caption strings, stopping at end-of-sequence."""
        out = []
        for seq in ids:
            seq = list(seq)
            if self.eos_token_id in seq:
                seq = seq[: seq.index(self.eos_token_id)]
            out.append(" ".join(self.tokenizer.decode(seq, skip_special_tokens=True).split()))
        return out


def build_model(config: ModelConfig, *, captions: Sequence[str] | None = None, tokenizer=None,
                pretrained: bool = True) -> CapDecModel:
    """A new model for training (``pretrained=True`` loads a pretrained LM's weights).

    For ``lm="scratch"`` a tokenizer is trained on ``captions`` unless one is given; the resolved LM
    config is written into ``config.lm_config`` so a checkpoint can rebuild the model offline.
    """
    if config.lm == "scratch":
        if tokenizer is None:
            if captions is None:
                raise InputError("a from-scratch LM needs the training captions to train its tokenizer")
            tokenizer = train_tokenizer(captions, vocab_size=config.vocab_size, lowercase=config.lowercase)
        if config.lm_config is None:
            config.lm_config = scratch_lm_config(
                tokenizer, dim=config.lm_dim, depth=config.lm_depth, heads=config.lm_heads,
                n_positions=config.prefix_length + config.entity_slots + config.max_length + 8,
                dropout=config.dropout)
        lm = lm_from_config(config.lm_config)
    else:
        tokenizer = tokenizer or load_tokenizer(config.lm)
        if pretrained or config.lm_config is None:
            lm = load_pretrained_lm(config.lm)
            config.lm_config = lm.config.to_dict()
        else:
            lm = lm_from_config(config.lm_config)
    need = config.prefix_length + config.entity_slots + config.max_length
    if getattr(lm.config, "n_positions", None) and need > lm.config.n_positions:
        raise InputError(f"prefix + entity slots + max_length = {need} exceeds the LM's {lm.config.n_positions} "
                         "positions")
    return CapDecModel(config, lm, tokenizer)


def model_from_config(config: ModelConfig, tokenizer) -> CapDecModel:
    """An uninitialised model of the recorded architecture (weights are loaded by the checkpoint)."""
    if config.lm_config is None:
        raise InputError("the model config has no lm_config; the checkpoint is incomplete")
    return CapDecModel(config, lm_from_config(config.lm_config), tokenizer)
