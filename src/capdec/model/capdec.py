"""CapDecModel: mapping network + causal LM, and the typed config that rebuilds it.

Notation: b - batch, d - embedding dim, L - prefix length, t - caption tokens, h - LM hidden size,
V - vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from capdec.configs import ModelConfig
from capdec.errors import InputError
from capdec.model.lm import (
    lm_from_config,
    load_pretrained_lm,
    load_tokenizer,
    scratch_lm_config,
    train_tokenizer,
)
from capdec.model.mapper import (
    ClipCapTransformerMapper,
    IFCapFusion,
    MLPMapper,
    RetrievalFusion,
    TransformerMapper,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of prefix and padding positions: never a real token id


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
        self.fusion: nn.Module | None = None
        if config.retrieval_k and config.retrieval_fusion == "ifcap":
            if not hasattr(self.mapper, "clip_tokens"):
                raise InputError("IFCap's fusion needs the transformer mapper (its clip tokens)")
            self.fusion = IFCapFusion(dim=config.embed_dim, hidden=hidden, heads=config.mapper_heads)
        elif config.retrieval_k:
            self.fusion = RetrievalFusion(dim=config.embed_dim)
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
        if self.fusion is not None and retrieved is None:
            raise InputError("this model was trained with retrieval: it needs retrieved caption embeddings "
                             "(a memory; see capdec caption --memory)")
        if isinstance(self.fusion, IFCapFusion):  # fused in the LM's space, on the mapper's clip tokens
            out = self.mapper.from_clip_tokens(self.fusion(self.mapper.clip_tokens(emb), retrieved.to(emb)))
        else:
            if self.fusion is not None:
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
                prompt_ids: Sequence[Sequence[int]] | None = None, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the caption tokens given the prefix of ``emb``: their mean, or ``reduction="sum"``.

        ``input_ids``/``attention_mask``: (b, t), right-padded, end-of-sequence included. ``prompt_ids``:
        one hard prompt per row (entity prompts), fed between the prefix and the caption and never scored.
        Logits are computed for the caption positions only (the prefix positions' predictions are never
        scored), which at GPT-2's 50k vocabulary and a 40-vector prefix is most of the LM head's work.
        """
        prefix = self.prefix(emb, retrieved=retrieved, entity_ids=entity_ids)  # (b, L, h)
        b, L, _ = prefix.shape
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        n_scored = attention_mask.sum()
        if prompt_ids is not None:
            input_ids, attention_mask, labels = self._with_prompts(prompt_ids, input_ids, attention_mask)
        tokens = self.lm.get_input_embeddings()(input_ids)  # (b, t, h)
        inputs = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (b, L+t, h)
        mask = torch.cat([attention_mask.new_ones(b, L), attention_mask], dim=1)  # (b, L+t)
        logits = self._caption_logits(inputs, mask, L)  # position L-1+i predicts token i: (b, t, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        if reduction == "sum":
            return loss
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return loss / n_scored.clamp(min=1)

    def _with_prompts(self, prompt_ids: Sequence[Sequence[int]], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's prompt tokens, then its caption tokens, right-padded: (ids, mask, labels), (b, p + t).

        The prompt positions are labelled IGNORE_INDEX (never scored), as IFCap's hard prompts.
        """
        b, t = input_ids.shape
        if len(prompt_ids) != b:
            raise ValueError(f"{len(prompt_ids)} prompts for {b} captions")
        width = t + max((len(p) for p in prompt_ids), default=0)
        ids = input_ids.new_full((b, width), self.pad_token_id)
        mask = attention_mask.new_zeros((b, width))
        labels = input_ids.new_full((b, width), IGNORE_INDEX)
        lengths = attention_mask.sum(dim=1).tolist()
        for i, (prompt, n) in enumerate(zip(prompt_ids, lengths)):
            p = len(prompt)
            ids[i, :p] = torch.as_tensor(list(prompt), dtype=ids.dtype)
            ids[i, p : p + n] = input_ids[i, :n]
            labels[i, p : p + n] = input_ids[i, :n]
            mask[i, : p + n] = 1
        return ids, mask, labels

    def with_prompts(self, prefix: torch.Tensor, prompt_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """(b, L, h) soft prefixes -> one (L + p_i, h) prefix per row with its hard prompt's token embeddings."""
        embed = self.lm.get_input_embeddings()
        out = []
        for row, prompt in zip(prefix, prompt_ids):
            tok = embed(torch.as_tensor(list(prompt), dtype=torch.long, device=row.device))  # (p, h)
            out.append(torch.cat([row, tok.to(row.dtype)], dim=0))
        return out

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


def prompt_positions(config: ModelConfig) -> int:
    """LM positions reserved for an entity hard prompt: "There are e1, …, em in image." at up to 3 tokens an entity."""
    return 8 + 3 * config.entity_max if config.entity_prompt else 0


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
                n_positions=config.prefix_length + config.entity_slots + prompt_positions(config)
                + config.max_length + 8,
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
