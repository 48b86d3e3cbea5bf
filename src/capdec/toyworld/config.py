"""Typed configs of the mini-CLIP and its training, kept free of torch so the CLI stays fast to start."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from capdec.errors import InputError
from capdec.toyworld.grammar import get_grammar

# CapDec's noise variance for toy-world experiments with the shipped mini-CLIP (``capdec demo``, its
# --compare/--methods, --styles, --cross-domain; ``capdec sweep`` lists its own). Not the paper's 0.016
# (chosen for a 640-d CLIP on COCO): picked on validation seeds 2 and 3 at the demo's budget (600 steps
# x 128, 20k captions, 300 test images) as the best mean CIDEr among 0, 0.002, 0.004, 0.008, 0.016:
# 0.008 (1.441; 0.002-0.008 within 1 %, 0.016 12 % lower, no noise 33 % lower). The reported seeds 0
# and 1 were not used. Table: docs/results/sweep_demo_budget.md.
TOY_NOISE_VARIANCE = 0.008


@dataclass
class MiniCLIPConfig:
    """Every hyperparameter needed to rebuild a mini-CLIP (stored as ``config.json``)."""

    dim: int = 128  # joint embedding size
    image_size: int = 32  # input images are image_size x image_size RGB
    channels: tuple[int, ...] = (16, 32, 64, 128)  # conv widths; each stage after the first halves h and w
    image_hidden: int = 256  # width of the MLP head on the flattened final feature map
    vocab: tuple[str, ...] = field(default_factory=lambda: tuple(get_grammar("default").vocabulary()))
    context_length: int = 40  # tokens, [CLS] included
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_conv_kernel: int = 3  # width of the word convolution before attention (odd; 0: none)
    logit_scale: float = 100.0  # fixed inverse temperature of the contrastive loss
    pixel_mean: float = 0.5  # images are (x / 255 - mean) / std
    pixel_std: float = 0.25

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.vocab = tuple(self.vocab)
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise InputError(f"image_size {self.image_size} must be divisible by 2^{len(self.channels) - 1} "
                             f"(one halving per conv stage after the first)")
        if self.text_conv_kernel < 0 or (self.text_conv_kernel and self.text_conv_kernel % 2 == 0):
            raise InputError(f"text_conv_kernel must be 0 or odd, got {self.text_conv_kernel}")
        if self.text_width % self.text_heads:
            raise InputError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"], d["vocab"] = list(self.channels), list(self.vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniCLIPConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InputError(f"mini-CLIP config has unknown fields {sorted(unknown)} (written by a newer capdec?)")
        return cls(**d)



@dataclass
class ClipTrainConfig:
    """Hyperparameters of a mini-CLIP training run (recorded in the card)."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3  # peak AdamW learning rate
    warmup: int = 50  # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    seed: int = 0
    grammar: str = "default"  # caption grammar the text tower learns (get_grammar)
    # fraction of each batch that are near-duplicates of other scenes in it (one fact changed):
    # hard negatives that teach colour-shape binding, sizes and positions
    hard_negatives: float = 0.25
    eval_every: int = 100  # steps between validation R@1 checks (0: never)
    eval_pairs: int = 500  # val-split pairs for those checks (and a fifth as many near-duplicate pairs per kind)
    save_every: int = 100  # steps between resumable train_state.pt saves (0: never)
    stats_pairs: int = 1000  # test-split pairs for the final card statistics
    stats_hard_negative_pairs: int = 300  # test-split near-duplicate pairs per kind for the card (0: skip)
    model: MiniCLIPConfig = field(default_factory=MiniCLIPConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d
