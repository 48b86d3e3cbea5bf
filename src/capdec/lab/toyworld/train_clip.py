"""Training the mini-CLIP contrastively on freshly drawn toy scenes (``capdec toyworld train-clip``).

Every step draws a new batch of train-split scenes and one caption each, from a generator seeded by
``(seed, step)``: there is no data set to overfit, and a resumed run sees exactly the batches the
uninterrupted run would have seen. The output directory is a mini-CLIP weights directory
(``config.json``, ``model.safetensors``, ``card.json``) that ``load_encoder("toy:DIR")`` loads;
while training it also holds ``train_state.pt`` (model + optimiser, for ``--resume``), removed at
the end.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from capdec.artifacts import load_tensors
from capdec.encoders.miniclip import (
    CARD_FILE,
    WEIGHTS_FILE,
    MiniCLIP,
    embed_images,
    embed_texts,
    load_pretrained,
    pixels_from_array,
    save_pretrained,
    weights_fingerprint,
)
from capdec.errors import InputError, TrainingError
from capdec.lab.toyworld.config import ClipTrainConfig
from capdec.lab.toyworld.grammar import captions, get_grammar
from capdec.lab.toyworld.render import render_array
from capdec.lab.toyworld.stats import clip_stats
from capdec.lab.toyworld.world import (
    DEFAULT_WORLD,
    PERTURBATIONS,
    Scene,
    WorldConfig,
    perturb_scene,
    random_scene,
    split_of,
)
from capdec.utils import progress, seed_everything, write_json

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


def lr_at(step: int, cfg: ClipTrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress_ = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))


# How often each kind of hard negative is drawn. Colour-shape binding gets the most: without these
# pairs the image tower learns a bag of colours and a bag of shapes (swapped scenes embed alike).
HARD_NEGATIVE_WEIGHTS = {"swap_colours": 3.0, "recolour": 1.5, "reshape": 1.5, "resize": 2.0, "move": 2.0}


def make_batch(step: int, cfg: ClipTrainConfig, world: WorldConfig = DEFAULT_WORLD,
               ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Step ``step``'s batch: (b, h, w, 3) uint8 pixels, one caption per scene, (b, b) same-scene mask.

    A fraction ``cfg.hard_negatives`` of the batch are near-duplicates of other scenes in it
    (:func:`~capdec.lab.toyworld.world.perturb_scene`), captioned so that each caption is true of its
    own scene only; the rest are independent scenes. Every scene is a train-split scene.
    """
    rng = random.Random(f"capdec.toyworld/train-clip/{cfg.seed}/{step}")
    grammar = get_grammar(cfg.grammar)
    kinds, weights = list(HARD_NEGATIVE_WEIGHTS), list(HARD_NEGATIVE_WEIGHTS.values())
    n_pairs = int(cfg.batch_size * cfg.hard_negatives) if cfg.batch_size >= 4 else 0
    scenes: list[Scene] = []
    texts: list[str] = []
    while len(scenes) < cfg.batch_size:
        scene = random_scene(rng, world)
        if split_of(scene) != "train":
            continue
        partner, g = None, grammar
        if n_pairs > 0 and len(scenes) + 2 <= cfg.batch_size:
            for _ in range(4):  # a kind may not apply, or may land the partner in another split
                kind = rng.choices(kinds, weights)[0]
                partner = perturb_scene(scene, kind, rng, world)
                if partner is not None and split_of(partner) == "train":
                    g = grammar.stating(PERTURBATIONS[kind])  # both captions state the changed fact
                    break
                partner = None
        for s in (scene,) if partner is None else (scene, partner):
            scenes.append(s)
            texts.append(captions(s, 1, rng=rng, grammar=g)[0])
        n_pairs -= partner is not None
    keys = [s.key for s in scenes]
    same = torch.tensor([[a == b for b in keys] for a in keys])
    return torch.from_numpy(render_array(scenes, cfg.model.image_size)), texts, same


def _optimizer(model: MiniCLIP, cfg: ClipTrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def _quick_eval(model: MiniCLIP, cfg: ClipTrainConfig) -> dict[str, float]:
    was_training = model.training
    model.eval()
    stats = clip_stats(lambda ims: embed_images(model, list(ims)), lambda ts: embed_texts(model, list(ts)),
                       n=cfg.eval_pairs, seed=cfg.seed, split="val", hard_negatives=cfg.eval_pairs // 5)
    model.train(was_training)
    return _rounded({k: stats[k] for k in ("text_to_image_r1", "image_to_text_r1", "matched_cosine",
                                           "hard_negative_accuracy")})


def _save_state(path: Path, model: MiniCLIP, opt: torch.optim.Optimizer, step: int, history: list,
                elapsed: float, cfg: ClipTrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history,
                "elapsed": elapsed, "config": cfg.to_dict()}, tmp)
    os.replace(tmp, path)


def train_clip(cfg: ClipTrainConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
               command: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train a mini-CLIP into ``out_dir``; return its card (also written to ``out_dir/card.json``)."""
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    if (out_dir / WEIGHTS_FILE).exists() and not (overwrite or resume):
        raise InputError(f"{out_dir} already holds a trained mini-CLIP; pass --overwrite to replace it")
    if resume and not state_path.exists():
        raise InputError(f"--resume: {state_path} not found (nothing to resume; drop --resume to start afresh)")
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InputError(f"need steps >= 1 and batch size >= 2, got {cfg.steps} and {cfg.batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    model = MiniCLIP(cfg.model).to(device).train()
    opt = _optimizer(model, cfg)
    start, history, elapsed = 0, [], 0.0
    if resume:
        state = load_tensors(state_path, what="a mini-CLIP training state")
        if state["config"] != cfg.to_dict():
            diff = sorted(k for k in state["config"] if state["config"][k] != cfg.to_dict().get(k))
            raise InputError(f"--resume: {state_path} was made with different options ({', '.join(diff)}); "
                             f"resume with the same options, or start afresh with --overwrite")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], state["history"], state["elapsed"]
        logger.info("resuming %s at step %d/%d", out_dir, start, cfg.steps)
    params = model.num_parameters()
    logger.info("mini-CLIP: %d image + %d text parameters, %d steps of %d pairs",
                params["image"], params["text"], cfg.steps, cfg.batch_size)

    t0 = time.time() - elapsed
    bar = progress(range(start, cfg.steps), desc="train-clip", initial=start, total=cfg.steps)
    loss_sum, loss_n = 0.0, 0
    for step in bar:
        pixels, texts, same = make_batch(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(pixels_from_array(pixels.numpy(), cfg.model).to(device), model.tokenizer(texts).to(device),
                     same.to(device))
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {step}; try a lower --lr "
                                f"(the last good state is in {state_path} if one was saved)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step, cfg):.1e}")
        done = step + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            entry = {"step": done, "loss": round(loss_sum / loss_n, 4), **_quick_eval(model, cfg),
                     "seconds": round(time.time() - t0, 1)}
            history.append(entry)
            loss_sum, loss_n = 0.0, 0
            logger.info("step %d: %s", done, entry)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            _save_state(state_path, model, opt, done, history, time.time() - t0, cfg)
    train_seconds = time.time() - t0

    # the card describes the weights as shipped (fp16), so measure them after a save/load round trip
    save_pretrained(model.cpu(), out_dir)
    shipped = load_pretrained(out_dir)
    stats = clip_stats(lambda ims: embed_images(shipped, list(ims)), lambda ts: embed_texts(shipped, list(ts)),
                       n=cfg.stats_pairs, seed=cfg.seed, hard_negatives=cfg.stats_hard_negative_pairs)
    card = {
        "name": "capdec toy-world mini-CLIP",
        "description": "Conv image tower + 2-layer text transformer trained contrastively on procedural toy "
                       "scenes with a fixed logit scale, so that a CLIP-like modality gap remains.",
        "command": command,
        "seed": cfg.seed,
        "train_config": cfg.to_dict() | {"model": {k: v for k, v in cfg.model.to_dict().items() if k != "vocab"}},
        "vocab_size": len(cfg.model.vocab),
        "parameters": params,
        "stats": _rounded(stats),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {"capdec": _capdec_version(), "torch": torch.__version__, "python": platform.python_version()},
        "weights_sha256": weights_fingerprint(out_dir),
    }
    write_json(out_dir / CARD_FILE, card)
    state_path.unlink(missing_ok=True)
    return card


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def _capdec_version() -> str:
    from capdec import __version__

    return __version__
