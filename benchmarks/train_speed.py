"""Benchmark the training step at the paper's architecture: plain fp32 vs capdec's fast step, side by side.

Real sizes, random weights (no pretrained weights exist offline; speed does not depend on them):
CapDec's transformer mapper (8 layers, 8 heads, prefix 40, clip 40) on 512-d embeddings and a
GPT-2-small LM (``GPT2Config()``: 12 layers, 768 wide, 12 heads, vocabulary 50257). Captions are real
COCO captions (tests/data/coco) with a corpus BPE tokenizer, so batches have COCO's caption lengths;
embeddings are random unit vectors.

The model first trains ``--pretrain-steps`` steps (capdec's step, fp32) so that its loss is well below
its value at initialisation (ln 50257 ≈ 10.8, where every variant agrees trivially). Then two variants
train two copies of that model on the *same* batches, alternating step by step so that a shared
machine's load affects both equally:

- ``plain``: what a straightforward loop does (and capdec did before): fp32, LM logits for every position
  (prefix included) then sliced, PyTorch's default AdamW, the loss read back every step;
- ``fast``: ``capdec.train``'s own step: bf16 autocast where the device has bf16 units (``--amp``),
  logits for caption positions only, fused AdamW, no host sync, padding trimmed per batch (both variants
  trim: the old loop did too).

Prints one JSON object (also written to ``--out``): samples/s and caption tokens/s per variant (median
over the timed steps), the speed-up, both variants' per-step losses and their relative differences
(the first compared step sees identical weights, so it measures bf16's forward error alone; bf16
tolerance: ~1e-2), the pre-training losses, on a GPU the model FLOPs utilisation (MFU), and the run's
command, machine, threads and load average (``run``)::

    .venv/bin/python benchmarks/train_speed.py --threads 1            # ~8 min of CPU time on one core, ~7 GB of RAM
    .venv/bin/python benchmarks/train_speed.py --device cuda --batch-size 34 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from coco import annotations
from run_record import finish, start

from capdec.distributed import DistInfo
from capdec.model import IGNORE_INDEX, CapDecModel, ModelConfig, build_model
from capdec.model.lm import train_tokenizer
from capdec.noise import NoiseConfig, add_noise
from capdec.store import EmbeddingStore
from capdec.textdata import load_text_data
from capdec.train import TrainConfig, amp_dtype, cpu_has_bf16, make_optimizer, step_seed
from capdec.train.loop import _autocast, _train_step
from capdec.utils import release_freed_memory

logger = logging.getLogger("capdec.benchmarks.train_speed")

# dense bf16 peak TFLOP/s for MFU (per GPU, no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0, "L4": 121.0}


def captions() -> list[str]:
    return [a["caption"].strip() for a in annotations("captions_val2017")]


def build(batch_size: int, seed: int, workdir: Path) -> tuple[CapDecModel, Any]:
    """The paper-sized model (random weights) and a TextData of COCO captions with random embeddings."""
    from transformers import GPT2Config

    caps = captions()
    tok = train_tokenizer(caps, vocab_size=8000)  # its ids lie inside GPT-2's 50257-token head
    cfg = ModelConfig(embed_dim=512, mapper="transformer", prefix_length=40, clip_length=40, mapper_depth=8,
                      mapper_heads=8, lm="scratch", max_length=40, dropout=0.0,
                      lm_config={**GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to_dict(),
                                 "model_type": "gpt2"})
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer=tok)
    emb = F.normalize(torch.randn(len(caps), 512, generator=torch.Generator().manual_seed(seed)), dim=-1)
    store = EmbeddingStore.from_arrays(caps, emb, encoder_spec={"kind": "random"},
                                       encoder_identity={"kind": "random", "dim": 512}).save(workdir / "store")
    data = load_text_data([store.path])
    data.attach_tokenizer(tok, show_progress=False)
    return model, data


def plain_step(model: CapDecModel, opt: torch.optim.Optimizer, emb: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor) -> float:
    """The straightforward fp32 step: full-sequence logits, sliced to the caption positions."""
    prefix = model.prefix(emb)  # (b, L, h)
    b, L, _ = prefix.shape
    tokens = model.lm.get_input_embeddings()(ids)  # (b, t, h)
    logits = model.lm(inputs_embeds=torch.cat([prefix, tokens], 1),
                      attention_mask=torch.cat([mask.new_ones(b, L), mask], 1)).logits[:, L - 1 : -1]  # (b, t, V)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)


def flops_per_step(model: CapDecModel, batch: int, caption_tokens: float, prefix_positions: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward; 2 per multiply-add), matrices only (the usual 6N rule)."""
    def n_params(module, skip=()):
        return sum(p.numel() for n, p in module.named_parameters() if p.ndim >= 2 and not n.startswith(skip))

    mapper = n_params(model.mapper) * (model.config.clip_length + model.config.prefix_length) * batch
    lm_body = n_params(model.lm, skip=("transformer.wte", "transformer.wpe", "lm_head")) * (
        prefix_positions * batch + caption_tokens)
    head = model.lm.get_output_embeddings().weight.numel() * caption_tokens
    return 6.0 * (mapper + lm_body + head)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=34)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--pretrain-steps", type=int, default=30,
                   help="steps of capdec's fp32 step before the comparison (away from the loss at initialisation)")
    p.add_argument("--pretrain-lr", type=float, default=5e-4, help="learning rate of those steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: the machine may be shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"], help="the fast variant's amp")
    p.add_argument("--lr", type=float, default=2e-5, help="CapDec's learning rate (no warm-up here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    record = start(argv, threads=args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        model, data = build(args.batch_size, args.seed, Path(tmp))
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
        train_idx = torch.arange(len(data))
        noise = NoiseConfig(variance=0.016)
        params = lambda m: [q for q in m.parameters() if q.requires_grad]  # noqa: E731
        pretrain_losses = pretrain(model.to(device).train(), data, order, train_idx, noise, args, device, params)
        gc.collect()  # the pre-training optimizer's state, before two more optimizers are made
        release_freed_memory()
        order = order[args.pretrain_steps * args.batch_size:]  # the comparison's batches are new to the model
        plain_model = model
        fast_model = copy.deepcopy(plain_model)
        plain_opt = torch.optim.AdamW(params(plain_model), lr=args.lr, weight_decay=0.01)
        fast_opt = make_optimizer(params(fast_model), lr=args.lr, weight_decay=0.01, device=device)
        autocast, scaler = _autocast(device, args.amp)
        config = TrainConfig(batch_size=args.batch_size, amp=args.amp, seed=args.seed, grad_clip=1.0)
        times: dict[str, list[float]] = {"plain": [], "fast": []}
        losses: dict[str, list[float]] = {"plain": [], "fast": []}
        tokens: list[int] = []
        for step in range(args.warmup + args.steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            # plain: the same noise the fast step draws (same seed and stream)
            emb = data.embeddings_at(idx).to(device=device, dtype=torch.float32)
            emb = add_noise(emb, noise, generator=torch.Generator(device=device).manual_seed(
                step_seed(args.seed, step, stream=3)))
            ids, mask = data.tokens_at(idx, max_length=40, eos=model.eos_token_id, pad=model.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            _sync(device)
            t0 = time.perf_counter()
            losses["plain"].append(plain_step(plain_model, plain_opt, emb, ids, mask))
            _sync(device)
            t1 = time.perf_counter()
            loss, n_tok = _train_step(model=fast_model, optimizer=fast_opt, scaler=scaler, autocast=autocast, data=data,
                                      idx=idx, noise=noise, config=config, step=step, device=device,
                                      dist_info=DistInfo(), train_idx=train_idx)
            _sync(device)
            t2 = time.perf_counter()
            losses["fast"].append(float(loss))
            logger.info("step %d: plain %.2f s (loss %.4f), fast %.2f s (loss %.4f), %d caption tokens", step,
                        t1 - t0, losses["plain"][-1], t2 - t1, losses["fast"][-1], n_tok)
            if step >= args.warmup:
                times["plain"].append(t1 - t0)
                times["fast"].append(t2 - t1)
                tokens.append(n_tok)

    mean_tokens = statistics.mean(tokens)
    result: dict[str, Any] = {
        "benchmark": "train_speed",
        "model": {"lm": "GPT2Config() 12x768, 12 heads, vocab 50257 (random weights)",
                  "mapper": "transformer, 8 layers, 8 heads, prefix 40, clip 40", "embed_dim": 512,
                  "parameters": sum(q.numel() for q in plain_model.parameters())},
        "batch_size": args.batch_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "caption_tokens_per_batch": mean_tokens,
        "pretrain": {"steps": args.pretrain_steps, "lr": args.pretrain_lr, "amp": "off",
                     "first_loss": pretrain_losses[0] if pretrain_losses else None,
                     "last_loss": pretrain_losses[-1] if pretrain_losses else None, "losses": pretrain_losses},
        "conditions": {"device": str(device), "cpu_bf16_units": cpu_has_bf16(),
                       "fast_amp": str(amp_dtype(device, args.amp)), "interleaved": True},
    }
    for name in ("plain", "fast"):
        sec = statistics.median(times[name])
        result[name] = {"seconds_per_step": sec, "samples_per_s": args.batch_size / sec,
                        "tokens_per_s": mean_tokens / sec, "step_seconds": times[name], "losses": losses[name]}
        if device.type == "cuda":
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
            flops = flops_per_step(plain_model, args.batch_size, mean_tokens, 40)
            result[name]["tflops"] = flops / sec / 1e12
            result[name]["mfu"] = flops / sec / 1e12 / peak if peak else None
    result["speedup_samples_per_s"] = result["fast"]["samples_per_s"] / result["plain"]["samples_per_s"]
    rel = [abs(a - b) / abs(a) for a, b in zip(losses["plain"], losses["fast"])]
    result["loss_relative_difference_first_step"] = rel[0]  # same weights: bf16's forward error alone
    result["loss_max_relative_difference"] = max(rel)
    result["run"] = finish(record)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def pretrain(model: CapDecModel, data: Any, order: torch.Tensor, train_idx: torch.Tensor, noise: NoiseConfig,
             args: argparse.Namespace, device: torch.device, params: Any) -> list[float]:
    """``--pretrain-steps`` of capdec's own step in fp32 on the model; returns their losses."""
    opt = make_optimizer(params(model), lr=args.pretrain_lr, weight_decay=0.01, device=device)
    config = TrainConfig(batch_size=args.batch_size, amp="off", seed=args.seed + 1, grad_clip=1.0)
    autocast, scaler = _autocast(device, "off")
    losses = []
    for step in range(args.pretrain_steps):
        idx = order[step * args.batch_size : (step + 1) * args.batch_size]
        loss, _ = _train_step(model=model, optimizer=opt, scaler=scaler, autocast=autocast, data=data, idx=idx,
                              noise=noise, config=config, step=step, device=device, dist_info=DistInfo(),
                              train_idx=train_idx)
        losses.append(float(loss))
        logger.info("pre-training step %d: loss %.4f", step, losses[-1])
    return losses


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



if __name__ == "__main__":
    main()
