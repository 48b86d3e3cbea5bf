"""Benchmark text embedding at ViT-B/32's text-tower size: CapDec's reference loop vs ``capdec embed``, side by side.

Real sizes, random weights (no pretrained weights exist offline; speed does not depend on them), for the
two backends users run, each saved to a local directory and loaded the way a user's copy is:

- ``open_clip``: open_clip's ``ViT-B-32`` config (text: 512 wide, 12 layers, 8 heads, context 77, vocabulary
  49408) as an open_clip model directory (``open_clip:local-dir:DIR``);
- ``hf``: transformers ``CLIPModel(CLIPConfig())`` (the same text-tower sizes) with the real CLIP BPE
  tokenizer (``hf:DIR``).

Captions are the 25,014 real COCO captions of ``tests/data/coco/captions_val2017.json.xz``, shuffled with
``--seed``.

- ``reference``: the text branch of CapDec's ``parse_coco.py``: one caption at a time, tokenised padded to
  77 tokens, ``encode_text`` in float32 under ``no_grad``, divided by its norm (written here with each
  library's own tokenizer and model calls);
- ``capdec``: :func:`capdec.store.embed_corpus`, the code behind ``capdec embed``, with its defaults
  (precision ``auto``, batch size 256, one shard of 4096 captions, float16 store), into a fresh store;
- ``capdec_fp32``: the same with ``precision="fp32"`` (what a CPU without bf16 units gets).

The variants alternate round by round (``--rounds``), each on new captions, so a shared machine's load
falls on all of them; the reference embeds the first ``--reference-per-round`` captions of the shard capdec
embeds in that round, and capdec's *stored* embeddings of those captions are compared with the reference's
(float32, full padding): the cosine's min and mean. Prints one JSON object (also written to ``--out``) with
captions/s of wall time and per CPU-second of the process (less sensitive to other processes), the
speed-ups (also each round's), the share of tokenising in capdec's time, and the run record (command,
machine, threads, load average: ``benchmarks/run_record.py``)::

    OMP_NUM_THREADS=1 python benchmarks/embed_speed.py --out docs/results/bench/embed_speed.json  # ~20 min, 2 GB
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from coco import annotations
from run_record import finish, start

from capdec.corpus import captions_from_list
from capdec.encoders import load_encoder
from capdec.store import embed_corpus
from capdec.utils import cpu_has_bf16

logger = logging.getLogger("capdec.benchmarks.embed_speed")

CONTEXT = 77


# -- the models: ViT-B/32 sizes, random weights, saved like a user's local copy ---------------------------
def save_open_clip(directory: Path, seed: int) -> str:
    import open_clip
    from safetensors.torch import save_file

    config = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
              "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"])
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return f"open_clip:local-dir:{directory}"


def save_hf_clip(directory: Path, seed: int) -> str:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    CLIPModel(CLIPConfig()).save_pretrained(directory)
    # the CLIP BPE files, from the vocabulary open_clip ships (its special tokens spelled as Hugging Face does)
    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=CONTEXT)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(directory)
    return f"hf:{directory}"


# -- CapDec's loop -------------------------------------------------------------------------------------
def reference_loop(spec: str) -> Callable[[str], torch.Tensor]:
    """A function embedding one caption as CapDec's parse_coco.py does, with the upstream library alone."""
    if spec.startswith("hf:"):
        from transformers import AutoTokenizer, CLIPModel

        directory = spec.removeprefix("hf:")
        model = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)

        def encode(caption: str) -> torch.Tensor:
            tokens = tokenizer(caption, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
            out = model.get_text_features(**tokens)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
    else:
        import open_clip

        name = spec.removeprefix("open_clip:")
        model = open_clip.create_model(name, precision="fp32").eval()
        tokenizer = open_clip.get_tokenizer(name)

        def encode(caption: str) -> torch.Tensor:
            return model.encode_text(tokenizer(caption))  # (1, 77) ids

    def embed(caption: str) -> torch.Tensor:
        with torch.no_grad():
            emb = encode(caption)
            emb /= torch.norm(emb, keepdim=True)
        return emb[0]

    return embed


# -- timing ----------------------------------------------------------------------------------------------
def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``fn(*args, **kwargs)`` with the wall and process CPU seconds it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def embed_store(captions: list[str], out: Path, encoder: Any) -> Any:
    """What ``capdec embed`` does with a list of captions."""
    return embed_corpus(captions_from_list(captions), out, encoder, show_progress=False)


def rates(count: int, wall: float, cpu: float) -> dict[str, float]:
    return {"captions": count, "seconds": wall, "cpu_seconds": cpu, "captions_per_s": count / wall,
            "captions_per_cpu_s": count / cpu}


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=1)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def run_backend(name: str, spec: str, captions: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    reference = reference_loop(spec)
    encoders = {"capdec": load_encoder(spec, device="cpu"),
                "capdec_fp32": load_encoder(spec, device="cpu", precision="fp32")}
    # warm-up (kernel selection, first allocations), untimed
    for caption in captions[:4]:
        reference(caption)
    for variant, encoder in encoders.items():
        embed_store(captions[:256], work / f"{name}-{variant}-warmup", encoder)

    rounds: list[dict[str, tuple[int, float, float]]] = []
    ref_emb, stored = [], {v: [] for v in encoders}
    for r in range(args.rounds):
        shard = captions[r * args.shard_size : (r + 1) * args.shard_size]
        head = shard[: args.reference_per_round]
        emb, wall, cpu = timed(lambda texts: torch.stack([reference(c) for c in texts]).numpy(), head)
        ref_emb.append(emb)
        this = {"reference": (len(head), wall, cpu)}
        for variant, encoder in encoders.items():
            store, wall, cpu = timed(embed_store, shard, work / f"{name}-{variant}-{r}", encoder)
            assert store.captions == shard and store.meta["precision"] == encoder.text_precision
            stored[variant].append(np.asarray(store.embeddings[: len(head)], dtype=np.float32))
            this[variant] = (len(shard), wall, cpu)
        rounds.append(this)
        logger.info("%s round %d: %s (load %.1f)", name, r,
                    ", ".join(f"{v} {n / w:.1f}/s" for v, (n, w, _) in this.items()), os.getloadavg()[0])

    result: dict[str, Any] = {v: rates(*(sum(rd[v][i] for rd in rounds) for i in range(3))) for v in rounds[0]}
    ref = np.concatenate(ref_emb)
    for variant, encoder in encoders.items():
        result[variant].update(precision=encoder.text_precision, batch_size=encoder.batch_size,
                               shard_size=args.shard_size, cpu_batch_tokens=encoder.cpu_batch_tokens,
                               cosine_vs_fp32_full_padding=cosines(np.concatenate(stored[variant]), ref))
        result[f"speedup_{variant}"] = result[variant]["captions_per_s"] / result["reference"]["captions_per_s"]
        result[f"speedup_{variant}_cpu"] = (result[variant]["captions_per_cpu_s"]
                                            / result["reference"]["captions_per_cpu_s"])
    # each round's own ratio: how much it moved with the machine's load
    result["speedup_capdec_per_round"] = [(rd["capdec"][0] / rd["capdec"][1]) / (rd["reference"][0] / rd["reference"][1])
                                          for rd in rounds]
    tokens, _, cpu = timed(encoders["capdec"].tokenize_text, captions[: args.shard_size])
    result["mean_tokens_per_caption"] = float(tokens.lengths.float().mean())
    result["tokenize_share_of_capdec_cpu"] = cpu / args.shard_size / (result["capdec"]["cpu_seconds"]
                                                                      / result["capdec"]["captions"])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="open_clip,hf", help="comma-separated: open_clip, hf")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=4096, help="captions capdec embeds per round (its default shard)")
    p.add_argument("--reference-per-round", type=int, default=256, help="captions the reference loop embeds per round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: the machine may be shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    record = start(argv, threads=args.threads)
    # the captions as capdec reads them (whitespace normalised): both sides embed the same strings
    coco = captions_from_list([a["caption"] for a in annotations("captions_val2017")]).captions
    needed = args.rounds * args.shard_size
    if needed > len(coco):
        p.error(f"--rounds x --shard-size = {needed} captions, more than the {len(coco)} COCO captions")
    captions = [coco[i] for i in np.random.default_rng(args.seed).permutation(len(coco))[:needed]]
    backends = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.backends.split(","):
            (work / name).mkdir()
            spec = {"open_clip": save_open_clip, "hf": save_hf_clip}[name](work / name, args.seed)
            backends[name] = run_backend(name, spec, captions, args, work)

    import open_clip
    import transformers

    result = {
        "benchmark": "embed_speed",
        "model": "CLIP ViT-B/32 text tower (512 wide, 12 layers, 8 heads, context 77, vocabulary 49408), random weights",
        "captions": {"source": "tests/data/coco/captions_val2017.json.xz", "in_file": len(coco),
                     "rounds": args.rounds, "capdec_per_round": args.shard_size,
                     "reference_per_round": args.reference_per_round, "seed": args.seed},
        "versions": {"open_clip": open_clip.__version__, "transformers": transformers.__version__},
        "cpu_bf16_units": cpu_has_bf16(),
        "backends": backends,
        "speedup_capdec_min": min(b["speedup_capdec"] for b in backends.values()),
        "cosine_min": min(b["capdec"]["cosine_vs_fp32_full_padding"]["min"] for b in backends.values()),
        "run": finish(record),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
