"""The training planner (capdec.train.plan): every value of a run from its source, decided before anything runs.

Nothing here trains. Each plan is checked against values worked out in the test from the documented rules
(flag > config file > noise file > recipe > checkpoint > store > default, and the schedule's defaults), on
small stores of random unit rows (tests/tiny_stores.py) and a checkpoint saved from an untrained model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from capdec.calibrate import NOISE_FORMAT
from capdec.cli import main
from capdec.configs import ModelConfig, NoiseConfig, TrainConfig
from capdec.errors import InputError
from capdec.train import plan_training
from tiny_stores import ENCODER_SPEC, make_store

N, DIM = 60, 16
# the recorded run: what the checkpoint below says it was trained with
RECORDED_MODEL = dict(embed_dim=DIM, mapper="mlp", prefix_length=2, lm_dim=32, lm_depth=1, lm_heads=2, vocab_size=300)
RECORDED_TRAIN = dict(epochs=3, batch_size=8, lr=1e-3, seed=1, warmup_steps=None)
RECORDED_NOISE = 0.02
RECORDED_STATE = {"step": 2, "total_steps": 24, "train_loss": 5.0, "val_loss": 5.1, "peak_lr": 1e-3,
                  "warmup_steps": 1, "world_size": 1, "seconds": 1.0}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_stores")
    return {"text": make_store(root / "text", n=N, dim=DIM), "other": make_store(root / "other", n=40, dim=DIM, seed=1),
            "image": make_store(root / "image", n=N, dim=DIM, modality="image", seed=2)}


@pytest.fixture(scope="module")
def checkpoint(stores, tmp_path_factory) -> Path:
    """A resumable checkpoint of a run on the text store, saved from an untrained tiny model."""
    from capdec.checkpoint import save_checkpoint
    from capdec.model import build_model
    from capdec.model.lm import train_tokenizer
    from tiny_stores import captions

    out = tmp_path_factory.mktemp("plan_ckpt") / "run"
    model = build_model(ModelConfig(**RECORDED_MODEL), tokenizer=train_tokenizer(captions(N), vocab_size=300))
    save_checkpoint(out, model, encoder_spec=ENCODER_SPEC, encoder_identity={**ENCODER_SPEC, "dim": DIM},
                    noise=NoiseConfig(variance=RECORDED_NOISE), train=TrainConfig(**RECORDED_TRAIN).to_dict(),
                    extra={"data": {"stores": [str(stores["text"])], "modality": "text", "mix_weights": None,
                                    "count": N, "train": 59, "val": 1}, "init_from": None},
                    training_state=RECORDED_STATE)
    return out


def _source(plan, key: str) -> str:
    return plan.sources[key]


def dry_run(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["-q", "train", *argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def _tree(*dirs: Path) -> dict[str, str]:
    """Every file under ``dirs`` with the hash of its bytes and its mtime."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


# -- a new run ---------------------------------------------------------------------------------------
def test_defaults_and_the_derived_schedule(stores, tmp_path):
    plan = plan_training(stores["text"], tmp_path / "new")
    assert plan.mode == "new" and plan.state == {"step": 0}
    n_val = min(2000, int(N * 0.02))  # val_fraction, val_max
    assert (len(plan.split.train_idx), len(plan.split.val_idx)) == (N - n_val, n_val)
    steps_per_epoch = math.ceil((N - n_val) / 64)
    total = steps_per_epoch * 10
    assert plan.schedule.to_dict() == {"steps_per_epoch": steps_per_epoch, "total_steps": total, "peak_lr": 5e-4,
                                       "warmup_steps": min(5000, int(0.05 * total)),
                                       "eval_every": steps_per_epoch, "save_every": steps_per_epoch}
    assert plan.model_config == ModelConfig(embed_dim=DIM) and _source(plan, "model.embed_dim") == "store"
    assert plan.noise == NoiseConfig() and plan.config == TrainConfig()
    assert {k: v for k, v in plan.sources.items() if k.startswith(("model.", "noise.", "train."))
            and v != "default"} == {"model.embed_dim": "store"}
    assert plan.sources["schedule.peak_lr"].startswith("derived")
    # a pretrained LM gets CapDec's learning rate
    assert plan_training(stores["text"], tmp_path / "gpt", options={"lm": "gpt2"}).schedule.peak_lr == 2e-5


def test_flag_over_config_file_over_recipe_over_default(stores, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"batch_size": 12, "lr": 0.003, "epochs": 3, "prefix-length": 6}))
    plan = dry_run(capsys, str(stores["text"]), "--out", str(tmp_path / "o"), "--config", str(cfg),
                   "--recipe", "capdec-coco", "--batch-size", "10", "--lm", "scratch")
    got = {s: {k: (v["value"], v["source"]) for k, v in plan[s].items()} for s in ("model", "training", "noise")}
    assert got["training"]["batch_size"] == (10, "flag")  # flag over config file and recipe
    assert got["training"]["lr"] == (0.003, "config file")  # config file over recipe
    assert got["training"]["epochs"] == (3, "config file")
    assert got["model"]["prefix_length"] == (6, "config file")
    assert got["model"]["lm"] == ("scratch", "flag")
    assert got["training"]["weight_decay"] == (0.0, "recipe") and got["model"]["mapper_depth"] == (8, "recipe")
    assert got["noise"]["variance"] == (0.016, "recipe")
    assert got["training"]["amp"] == ("auto", "default") and got["model"]["lm_dim"] == (256, "default")
    assert plan["schedule"]["peak_lr"] == {"value": 0.003, "source": "config file"}
    assert plan["recipe"] == "capdec-coco" and plan["start"] == {"mode": "new", "step": 0, "total_steps": 3 * 6}


def test_dry_run_writes_nothing(stores, checkpoint, tmp_path, capsys):
    before = _tree(stores["text"], checkpoint)
    out = tmp_path / "never"
    plan = dry_run(capsys, str(stores["text"]), "--out", str(out), "--max-steps", "3")
    assert plan["schedule"]["total_steps"]["value"] == 3 and not out.exists()
    plan = dry_run(capsys, str(stores["text"]), "--out", str(checkpoint), "--resume", "--max-steps", "9")
    assert plan["start"] == {"mode": "resume", "step": 2, "total_steps": 9, "from": str(checkpoint)}
    assert _tree(stores["text"], checkpoint) == before  # no token cache built, nothing rewritten
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["run"]


def test_python_recipes_are_config_values(stores, tmp_path):
    paper = dict(epochs=10, lr=2e-5, weight_decay=0.0, warmup_steps=5000, schedule="linear", grad_clip=0.0,
                 keep_epochs=True, keep_best=True)  # CapDec's train.py, as docs/reproduce.md lists it
    assert TrainConfig.from_recipe("capdec-coco", batch_size=8) == TrainConfig(**paper, batch_size=8)
    assert NoiseConfig.from_recipe("capdec-flickr30k") == NoiseConfig(variance=0.016)
    assert ModelConfig.from_recipe("capdec-coco").prefix_length == 40
    plan = plan_training(stores["text"], tmp_path / "a", recipe="capdec-coco", options={"lm": "scratch"})
    assert plan.config == TrainConfig(**paper, batch_size=30)
    assert _source(plan, "train.lr") == "recipe" and _source(plan, "model.lm") == "argument"
    # a config object is used whole, but for the fields it leaves None ("decide for me"): the recipe's there
    plan = plan_training(stores["text"], tmp_path / "b", recipe="capdec-coco", config=TrainConfig(batch_size=8),
                         options={"lm": "scratch"})
    assert plan.config == TrainConfig(batch_size=8, lr=2e-5, warmup_steps=5000)
    assert _source(plan, "train.epochs") == "argument" and plan.model_config.mapper_depth == 8
    with pytest.raises(InputError, match="unknown recipe"):
        plan_training(stores["text"], tmp_path / "c", recipe="capdec-cocoa")
    with pytest.raises(InputError, match="unknown option 'batch_sise'"):
        plan_training(stores["text"], tmp_path / "c", options={"batch_sise": 3})


def test_derived_values(stores, tmp_path):
    mean_file = tmp_path / "mean.json"
    mean_file.write_text(json.dumps([0.0] * DIM))
    plan = plan_training(stores["text"], tmp_path / "c", options={"center": True, "image_mean": str(mean_file)})
    rows = np.load(stores["text"] / "embeddings.npy").astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    want = rows[plan.split.train_idx.numpy()].mean(0)
    np.testing.assert_allclose(plan.noise.text_mean, want, atol=1e-6)
    assert _source(plan, "noise.text_mean").startswith("derived") and plan.inference.image_mean == [0.0] * DIM
    plan = plan_training(stores["text"], tmp_path / "p", options={"project": True})
    assert plan.config.save_memory and _source(plan, "train.save_memory").startswith("derived")
    plan = plan_training(stores["text"], tmp_path / "v", options={"val_store": str(stores["other"]), "seed": 4,
                                                                   "batch_size": 7, "eval_every": 3})
    assert len(plan.split.train_idx) == N and len(plan.split.val_idx) == 40 and plan.split.val_data is not plan.data
    assert (plan.schedule.steps_per_epoch, plan.schedule.eval_every, plan.schedule.save_every) == (math.ceil(N / 7), 3,
                                                                                                 math.ceil(N / 7))
    assert _source(plan, "schedule.eval_every") == "argument"


# -- image stores and noise files ----------------------------------------------------------------------
def test_image_store_noise(stores, tmp_path, capsys):
    image = str(stores["image"])
    variance = lambda plan: (plan["noise"]["variance"]["value"], plan["noise"]["variance"]["source"])  # noqa: E731
    out = ["--out", str(tmp_path / "o"), "--lm", "scratch"]
    assert variance(dry_run(capsys, image, *out)) == (0.0, "store")
    assert variance(dry_run(capsys, image, *out, "--recipe", "capdec-coco")) == (0.0, "store")  # issue 19, item 7
    assert variance(dry_run(capsys, image, *out, "--noise-variance", "0.016")) == (0.016, "flag")
    cfg = tmp_path / "c.json"
    cfg.write_text('{"noise_variance": 0.01}')
    assert variance(dry_run(capsys, image, *out, "--config", str(cfg), "--recipe", "capdec-coco")) == \
        (0.01, "config file")
    assert variance(dry_run(capsys, str(stores["text"]), *out, "--recipe", "capdec-coco")) == (0.016, "recipe")


def _noise_file(path: Path, **extra) -> Path:
    path.write_text(json.dumps({"format": NOISE_FORMAT, "variance": 0.04, "dim": DIM,
                                "encoder_identity": {**ENCODER_SPEC, "dim": DIM}, **extra}))
    return path


def test_noise_file_layers(stores, tmp_path):
    nf = _noise_file(tmp_path / "noise.json", offset=[0.5] * DIM)
    plan = plan_training(stores["text"], tmp_path / "a", noise_file=nf, recipe="capdec-coco", options={"lm": "scratch"})
    assert (plan.noise.variance, _source(plan, "noise.variance")) == (0.04, "noise file")  # over the recipe
    assert plan.noise.source == str(nf) and plan.noise.offset is None
    plan = plan_training(stores["text"], tmp_path / "b", noise_file=nf, use_offset=True,
                         options={"noise_variance": 0.1})
    assert (plan.noise.variance, _source(plan, "noise.variance")) == (0.1, "argument")  # a given value over the file
    assert plan.noise.offset == [0.5] * DIM and _source(plan, "noise.offset") == "noise file"
    with pytest.raises(InputError, match="has no modality offset"):
        plan_training(stores["text"], tmp_path / "c", noise_file=_noise_file(tmp_path / "n2.json"), use_offset=True)
    with pytest.raises(InputError, match="--use-offset needs --noise-file"):
        plan_training(stores["text"], tmp_path / "c", use_offset=True)


# -- resume and init-from ------------------------------------------------------------------------------
def test_resume_takes_the_checkpoint_and_applies_what_is_given(stores, checkpoint):
    plan = plan_training(stores["text"], checkpoint, resume=True)
    assert plan.mode == "resume" and plan.state["step"] == 2 and plan.changes == {}
    assert plan.config == TrainConfig(**RECORDED_TRAIN) and _source(plan, "train.batch_size") == "checkpoint"
    assert plan.model_config.lm_dim == 32 and _source(plan, "model.lm_dim") == "checkpoint"
    assert plan.noise.variance == RECORDED_NOISE and _source(plan, "noise.variance") == "checkpoint"
    # the recorded peak lr and warm-up stay (re-derived, the warm-up would be 5% of the new total: 0)
    assert (plan.schedule.peak_lr, plan.schedule.warmup_steps) == (1e-3, 1)
    assert _source(plan, "schedule.warmup_steps") == "checkpoint"
    plan = plan_training(stores["text"], checkpoint, resume=True, options={"max_steps": 5, "lr": 5e-4, "batch_size": 8,
                                                                            "save_every": 2})
    assert plan.changes == {"max_steps": (None, 5), "lr": (1e-3, 5e-4), "save_every": (None, 2)}
    assert plan.schedule.total_steps == 5 and plan.schedule.peak_lr == 5e-4 and plan.schedule.save_every == 2
    assert plan.opt_state is None  # the checkpoint was saved without one; read only when asked


@pytest.mark.parametrize("options, named", [
    ({"batch_size": 4}, "batch_size: 8 vs 4"),
    ({"seed": 0}, "seed: 1 vs 0"),
    ({"val_fraction": 0.1}, "val_fraction"),
    ({"lm_dim": 64}, "lm_dim: 32 vs 64"),
    ({"mapper": "transformer"}, "mapper: mlp vs transformer"),
    ({"noise_variance": 0.016}, "noise_variance: 0.02 vs 0.016"),
    ({"noise_distribution": "uniform"}, "noise_distribution"),
    ({"val_store": "elsewhere"}, "val_store"),
    ({"mix_weights": [1.0]}, "mix_weights"),
])
def test_resume_refuses_what_the_checkpoint_fixes(stores, checkpoint, options, named):
    with pytest.raises(InputError, match="--resume") as refused:
        plan_training(stores["text"], checkpoint, resume=True, options={"max_steps": 6, **options})
    assert named in str(refused.value)


def test_resume_refuses_other_stores_noise_file_and_a_budget_cut_short(stores, checkpoint, tmp_path):
    with pytest.raises(InputError, match="stores and mix_weights cannot change"):
        plan_training(stores["other"], checkpoint, resume=True)
    with pytest.raises(InputError, match="noise_variance: 0.02 vs 0.04"):  # the file's ε² is 0.04, the run's 0.02
        plan_training(stores["text"], checkpoint, resume=True, noise_file=_noise_file(tmp_path / "noise.json"))
    # recorded: 3 epochs of ceil(59 / 8) = 8 steps end the run at step 24, before the 100 asked for
    with pytest.raises(InputError, match="--max-steps 100: the run's epochs \\(3, recorded\\) end it at step 24"):
        plan_training(stores["text"], checkpoint, resume=True, options={"max_steps": 100})
    plan = plan_training(stores["text"], checkpoint, resume=True, options={"max_steps": 100, "epochs": 20})
    assert plan.schedule.total_steps == 100


@pytest.mark.parametrize("resume, values, message", [
    (True, {"noise_file": "NOISE"}, "cannot change noise_variance: 0.02 vs 0.04"),
    (True, {"batch_size": 4}, "cannot change batch_size: 8 vs 4"),
    (True, {"mix_weights": [1.0]}, "stores and mix_weights cannot change"),
    (True, {"max_steps": 100}, "--max-steps 100: the run's epochs (3, recorded) end it at step 24"),
    (False, {"mapper": "transformer"}, "its decoder architecture differs from the one asked for (mapper: mlp vs "
                                       "transformer)"),
])
def test_a_value_the_checkpoint_refuses_from_the_config_file_names_the_file(stores, checkpoint, tmp_path, capsys,
                                                                           resume, values, message):
    """--resume / --init-from refuse what the checkpoint fixes naming the options, so a refused value from
    --config FILE (or a noise file it names) names the file; the same values as flags name no file."""
    noise, cfg = str(_noise_file(tmp_path / "noise.json")), tmp_path / "c.json"
    values = {k: noise if v == "NOISE" else v for k, v in values.items()}
    start = ["--out", str(checkpoint), "--resume"] if resume else ["--out", str(tmp_path / "t"), "--init-from",
                                                                   str(checkpoint)]
    run = ["-q", "train", str(stores["text"]), *start, "--config", str(cfg), "--dry-run"]
    cfg.write_text(json.dumps(values))
    assert main(run) == 2
    assert f"--config {cfg}: " in (err := capsys.readouterr().err) and message in err, err
    cfg.write_text('{"log_every": 5}')  # a config file that gave something else
    assert main([*run, *(a for k, v in values.items()
                         for a in ["--" + k.replace("_", "-"), *map(str, v if isinstance(v, list) else [v])])]) == 2
    err = capsys.readouterr().err
    assert message in err and "--config" not in err, err


def test_resume_recipe_never_overrides_the_checkpoint(stores, checkpoint):
    plan = plan_training(stores["text"], checkpoint, resume=True, recipe="capdec-coco")
    assert plan.model_config.mapper == "mlp" and plan.model_config.prefix_length == 2  # recipe: transformer, 40
    assert plan.noise.variance == RECORDED_NOISE and plan.config.batch_size == 8  # recipe: 0.016, 30
    assert (plan.config.weight_decay, _source(plan, "train.weight_decay")) == (0.0, "recipe")  # may change
    assert plan.changes["weight_decay"] == (0.01, 0.0)


def test_init_from_takes_the_architecture_only(stores, checkpoint, tmp_path):
    plan = plan_training(stores["other"], tmp_path / "tuned", init_from=checkpoint, recipe="capdec-style")
    assert plan.mode == "init_from" and plan.lineage == str(checkpoint) and plan.state == {"step": 0}
    assert plan.model_config.to_dict() == {**ModelConfig(**RECORDED_MODEL).to_dict(),
                                           "lm_config": plan.model_config.lm_config}
    assert _source(plan, "model.mapper") == "checkpoint"
    assert (plan.config.batch_size, _source(plan, "train.batch_size")) == (16, "recipe")  # not the checkpoint's 8
    assert (plan.noise.variance, _source(plan, "noise.variance")) == (0.016, "recipe")  # not the checkpoint's 0.02
    same = plan_training(stores["other"], tmp_path / "same", init_from=checkpoint, options={"lm_dim": 32})
    assert same.config == TrainConfig() and same.noise == NoiseConfig()  # only the architecture is the checkpoint's
    with pytest.raises(InputError, match="its decoder architecture differs .*lm_dim: 32 vs 64"):
        plan_training(stores["other"], tmp_path / "x", init_from=checkpoint, options={"lm_dim": 64})
    with pytest.raises(InputError, match="--resume and --init-from cannot be combined"):
        plan_training(stores["other"], checkpoint, init_from=checkpoint, resume=True)
    with pytest.raises(InputError, match="fine-tunes a trained checkpoint: give --init-from"):
        plan_training(stores["other"], tmp_path / "y", recipe="capdec-style")
