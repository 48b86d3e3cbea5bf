"""The language models a prefix is decoded by, and their tokenizers.

Two kinds, one code path (both are Hugging Face causal LMs, so decoding and the KV cache are shared):
- a pretrained Hugging Face causal LM (GPT-2 in the paper), by hub id or local directory;
- ``scratch``: a small GPT-2-shaped LM trained from scratch, with a byte-level BPE tokenizer trained
  on the corpus (offline use, small corpora; DeCap trains a 4-layer decoder from scratch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from typing import Any

from capdec.errors import InputError

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def train_tokenizer(captions: Sequence[str] | Collection[str], *, vocab_size: int = 8000, lowercase: bool = True):
    """Byte-level BPE trained on ``captions`` (never an unknown character), with <pad>/<eos>/<unk>.

    ``captions``: a list, or any sized re-iterable (e.g. a stream read from a store's file).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if not len(captions):
        raise InputError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
    fast = _wrap_tokenizer(tok)
    logger.info("trained a byte-level BPE tokenizer: %d tokens", len(fast))
    return fast


def tokenizer_from_json(text: str):
    """A tokenizer made by :func:`train_tokenizer`, rebuilt from its JSON (``backend_tokenizer.to_str()``)."""
    from tokenizers import Tokenizer

    return _wrap_tokenizer(Tokenizer.from_str(text))


def _wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=EOS,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)


def load_tokenizer(name_or_dir: str, *, local_only: bool | None = None):
    """A tokenizer from a hub id or directory; refuses a tokenizer without an end-of-sequence token."""
    from transformers import AutoTokenizer

    local = os.path.isdir(name_or_dir) if local_only is None else local_only
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load a tokenizer from {name_or_dir!r}: {e}") from e
    if tok.eos_token_id is None:
        raise InputError(f"the tokenizer of {name_or_dir!r} has no end-of-sequence token; captions could not stop")
    if len(tok) < 16:
        raise InputError(f"the tokenizer of {name_or_dir!r} has only {len(tok)} tokens: the files are missing "
                         "or the hub lookup failed silently")
    return tok


def scratch_lm_config(tokenizer, *, dim: int, depth: int, heads: int, n_positions: int,
                      dropout: float) -> dict[str, Any]:
    """The transformers config dict of a from-scratch GPT-2-shaped decoder."""
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=dim, n_layer=depth,
                     n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return cfg.to_dict()


def lm_from_config(config: dict[str, Any]):
    """Build a causal LM with random weights from a transformers config dict (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise InputError("the LM config has no model_type; the checkpoint is incomplete")
    return _with_sdpa(lambda **kw: AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), **kw))


def load_pretrained_lm(name_or_dir: str):
    """A pretrained causal LM by hub id or local directory (local paths never download)."""
    from transformers import AutoModelForCausalLM

    local = os.path.isdir(name_or_dir)
    if not local and (name_or_dir.startswith((".", "/", "~")) or os.sep in name_or_dir.strip("/").replace("/", "", 1)):
        raise InputError(f"LM directory {name_or_dir!r} does not exist")
    try:
        return _with_sdpa(lambda **kw: AutoModelForCausalLM.from_pretrained(name_or_dir, local_files_only=local, **kw))
    except OSError as e:
        raise InputError(f"could not load the language model {name_or_dir!r}: {e}. Give a local directory with "
                         "config.json and weights, or a hub id with network access.") from e


def _with_sdpa(make):
    """Build with PyTorch's fused scaled-dot-product attention; models that lack it keep their own."""
    try:
        return make(attn_implementation="sdpa")
    except (ValueError, ImportError) as e:  # transformers refuses SDPA for architectures without it
        logger.info("SDPA attention unavailable for this LM (%s); using its default attention", e)
        return make()
