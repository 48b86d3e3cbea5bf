"""The config base (capdec.config_base): one unknown-key policy, and CLI flags generated from the dataclasses."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from capdec.checkpoint import InferenceConfig
from capdec.cli import build_parser, main
from capdec.config_base import given
from capdec.errors import InputError
from capdec.model import ModelConfig
from capdec.noise import NoiseConfig
from capdec.train import TrainConfig

BEFORE = Path(__file__).resolve().parent / "data" / "cli_flags_before_restructure.json"


def _describe(parser: argparse.ArgumentParser) -> list[dict]:
    """Every option of a parser as the fixture records it (written by the pre-restructure code)."""
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            rows.append({"dest": a.dest, "subcommands": {k: _describe(v) for k, v in a.choices.items()}})
            continue
        default = a.default if isinstance(a.default, (int, float, str, bool, type(None), list)) else repr(a.default)
        const = a.const if isinstance(a.const, (int, float, str, bool, type(None))) else repr(a.const)
        rows.append({"dest": a.dest, "flags": a.option_strings, "default": default,
                     "type": None if a.type is None else getattr(a.type, "__name__", repr(a.type)),
                     "action": type(a).__name__, "choices": list(a.choices) if a.choices else None,
                     "nargs": a.nargs, "required": a.required, "const": const})
    return rows


@pytest.fixture(scope="module")
def parsers_now() -> dict[str, list[dict]]:
    """Every command's options, described in a fresh process (tests elsewhere register toy grammars,
    which would add choices to 'capdec toyworld --grammar' in this one)."""
    code = ("import argparse, json, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from test_config import _describe\n"
            "from capdec.cli import COMMANDS, build_parser\n"
            "out = {}\n"
            "for c in COMMANDS:\n"
            "    p = build_parser(c)\n"
            "    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[c]\n"
            "    out[c] = _describe(sub)\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# deliberate changes to pre-restructure options (issue 12), each a widening: old command lines still work
CHANGED = {
    ("embed", "format"): "the choices gain karpathy and flickrstyle",
    ("caption", "images"): "IMAGES may be empty when --dataset gives the images (nargs '*' instead of '+')",
    ("caption", "normalize"): "--no-normalize gains its --normalize (an imported ClipCap model records raw inputs)",
    ("demo", "methods"): "the choices gain gap, gap_projection, ifcap and gap_ifcap (issue 22)",
}


@pytest.mark.parametrize("command", sorted(json.loads(BEFORE.read_text())))
def test_every_flag_name_type_and_default_is_kept(command, parsers_now):
    """Every option the pre-restructure CLI had is still there, unchanged. Commands and options added since
    (capdec serve, push, evaluate --checkpoint, ...) are new features, not part of the comparison."""
    before = json.loads(BEFORE.read_text())[command]
    now = {r["dest"]: r for r in parsers_now[command]}
    changed = [(r, now.get(r["dest"])) for r in before
               if now.get(r["dest"]) != r and (command, r["dest"]) not in CHANGED]
    assert changed == []
    assert all(dest in now for cmd, dest in CHANGED if cmd == command)


def _train_args(*flags: str) -> argparse.Namespace:
    return build_parser("train").parse_args(["train", "store", "--out", "o", *flags])


def test_train_flags_default_to_the_dataclass_defaults():
    args = _train_args()
    for f in ("epochs", "batch_size", "lr", "weight_decay", "schedule", "grad_clip", "amp", "val_fraction",
              "log_every", "seed", "device", "save_memory"):
        assert getattr(args, f) == TrainConfig.default(f), f
    assert (args.tau, args.project) == (InferenceConfig.default("tau"), InferenceConfig.default("project"))
    assert args.noise_distribution == NoiseConfig.default("distribution")
    # model flags are "not given" (None) so a checkpoint's values can apply; their help states the default
    assert given(args, ModelConfig) == {}
    assert ModelConfig(**given(_train_args("--lm-dim", "64", "--no-lowercase"), ModelConfig)) == \
        ModelConfig(lm_dim=64, lowercase=False)
    helps = {a.dest: a.help for a in build_parser("train")._subparsers._group_actions[0].choices["train"]._actions}
    assert f"(default: {ModelConfig.default('prefix_length')})" in helps["prefix_length"]


def test_a_new_field_is_one_line_and_becomes_a_flag():
    from dataclasses import dataclass

    from capdec.config_base import Config, add_arguments, option

    @dataclass
    class Toy(Config):
        width: int = option(7, "how wide")
        mode: str = option("a", "which mode", choices=("a", "b"))
        fast: bool = option(False, "go fast")
        hidden: int = option(3, "not on the CLI", cli=False)

    p = argparse.ArgumentParser()
    add_arguments(p, Toy)
    assert vars(p.parse_args([])) == {"width": 7, "mode": "a", "fast": False}
    assert vars(p.parse_args(["--width", "9", "--mode", "b", "--fast"])) == {"width": 9, "mode": "b", "fast": True}
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_unknown_keys_warn_when_reading_artefacts_and_are_refused_from_users(caplog):
    with caplog.at_level(logging.WARNING, logger="capdec.config_base"):
        cfg = TrainConfig.from_dict({"epochs": 3, "from_the_future": 1}, where="ckpt/config.json")
    assert cfg.epochs == 3 and "from_the_future" in caplog.text and "ckpt/config.json" in caplog.text
    with pytest.raises(InputError, match="unknown TrainConfig option.*from_the_future"):
        TrainConfig.from_dict({"from_the_future": 1}, strict=True)
    for cls in (ModelConfig, NoiseConfig, InferenceConfig):
        assert cls.from_dict(cls().to_dict()) == cls()


def test_a_config_file_with_an_unknown_option_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"batch_sise": 8}')
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "unknown option 'batch_sise'" in capsys.readouterr().err
    # argparse checks the choices of flags only: a config file's value meets the config's own check
    from tiny_stores import make_store

    cfg.write_text('{"schedule": "weekly"}')
    assert main(["train", str(make_store(tmp_path / "s")), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "schedule must be one of linear, cosine, constant, got 'weekly'" in capsys.readouterr().err
    cfg.write_text('{"batch_size": 8,\n "epochs": }')
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "c.json: line 2 column" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["caption", "serve"])
def test_decoding_flags_are_the_decode_config(command):
    """capdec caption / serve build their decoding flags from DecodeConfig: defaults, help and parsed values
    are the dataclass's, and a bad value is refused by the config's own check (one place)."""
    from capdec.configs import DecodeConfig

    parser = build_parser(command)._subparsers._group_actions[0].choices[command]
    actions = {a.dest: a for a in parser._actions}
    names = [f.name for f in fields(DecodeConfig) if f.metadata["cli"]]
    shown = [n for n in names if n in actions]
    assert {"strategy", "beam_size", "max_length", "length_penalty"} <= set(shown)
    for name in shown:
        assert actions[name].default == DecodeConfig.default(name), name
        assert actions[name].help == DecodeConfig.help(name).replace("%", "%%"), name
    args = parser.parse_args(["ckpt", "--strategy", "greedy", "--beam-size", "3", "--max-length", "7"])
    assert DecodeConfig(**given(args, DecodeConfig, shown)) == DecodeConfig(strategy="greedy", beam_size=3,
                                                                            max_length=7)


def test_caption_refuses_bad_decoding_and_projection_values_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")  # never opened: the values are checked first
    for flags, message in [(["--beam-size", "0"], "beam_size must be ≥ 1"),
                           (["--top-p", "1.5"], "top_p must be in (0, 1]"),
                           (["--tau", "0"], "tau (the projection temperature) must be > 0"),
                           (["--project-k", "0"], "project_k must be ≥ 1")]:
        assert main(["caption", missing, "x.jpg", *flags]) == 2
        assert message in capsys.readouterr().err, flags


@pytest.mark.parametrize("values, message", [
    ({"noise_gap_scale": -1}, "noise gap scale must be a finite number ≥ 0, got -1"),
    ({"noise_variance": -1}, "noise variance must be a finite number ≥ 0, got -1"),
    ({"dropout": 1.5}, "dropout must be in [0, 1), got 1.5"),
    ({"warmup_steps": -3}, "warmup_steps must be"),
])
def test_a_value_the_config_file_gave_is_refused_naming_the_file(tmp_path, capsys, values, message):
    """Whatever a config's own check words its message, the refused option is named with it (InputError.options),
    so capdec train says the value came from --config FILE; the same value given as a flag names no file."""
    from tiny_stores import make_store

    store, cfg = str(make_store(tmp_path / "s")), tmp_path / "c.json"
    cfg.write_text(json.dumps(values))
    assert main(["train", store, "--out", str(tmp_path / "o"), "--config", str(cfg), "--dry-run"]) == 2
    assert f"--config {cfg}: {message}" in capsys.readouterr().err
    (flag, value), = values.items()
    cfg.write_text('{"epochs": 2}')  # a config file that gave something else
    assert main(["train", store, "--out", str(tmp_path / "o"), "--config", str(cfg), "--dry-run",
                 "--" + flag.replace("_", "-"), str(value)]) == 2
    err = capsys.readouterr().err
    assert message in err and "--config" not in err


@pytest.mark.parametrize("values, others, message", [
    ({"center": True, "use_offset": True}, ["--noise-file", "NOISE"], "--center and --use-offset cannot be combined"),
    ({"use_offset": True}, ["--center", "--noise-file", "NOISE"], "--center and --use-offset cannot be combined"),
    ({"center": True}, [], "--center needs --image-mean FILE"),
    ({"image_mean": "MEAN"}, [], "--image-mean only makes sense with --center"),
    ({"noise_shape": "gap"}, [], "--noise-shape gap needs --noise-file"),
    ({"entity_vocab": "VOCAB"}, [], "--entity-vocab only makes sense with --entity-prompt"),
    ({"project": True}, ["--center", "--image-mean", "MEAN"], "--project and --center cannot be combined"),
    ({"center": True}, ["IMAGES", "--image-mean", "MEAN"], "--center cannot be used with a mix of text and image"),
    ({"retrieval_k": 2}, ["IMAGES"], "retrieval and entity prompts (--retrieval-k, --entity-prompt) cannot be used"),
])
def test_a_combination_the_config_file_gave_is_refused_naming_the_file(tmp_path, capsys, values, others, message):
    """The planner's checks across options name the options they refuse too, so a refused combination one of
    whose values came from --config FILE names the file; the same values as flags name no file."""
    from capdec.calibrate import NOISE_FORMAT
    from tiny_stores import ENCODER_SPEC, make_store

    files = {"NOISE": tmp_path / "noise.json", "MEAN": tmp_path / "mean.json", "VOCAB": tmp_path / "vocab.txt"}
    files["NOISE"].write_text(json.dumps({"format": NOISE_FORMAT, "variance": 0.04, "dim": 16, "offset": [0.1] * 16,
                                          "encoder_identity": {**ENCODER_SPEC, "dim": 16}}))
    files["MEAN"].write_text(json.dumps([0.0] * 16))
    files["VOCAB"].write_text("dog\ncat\n")
    path = {name: str(f) for name, f in files.items()}.get  # a placeholder's file, anything else as it is
    stores = [str(make_store(tmp_path / "s"))]
    if "IMAGES" in others:  # a mix of a text store and an image store
        stores.append(str(make_store(tmp_path / "i", modality="image", seed=2)))
    cfg = tmp_path / "c.json"
    run = ["train", *stores, "--out", str(tmp_path / "o"), "--config", str(cfg), "--dry-run",
           *(path(a, a) for a in others if a != "IMAGES")]
    cfg.write_text(json.dumps({k: path(v, v) if isinstance(v, str) else v for k, v in values.items()}))
    assert main(run) == 2
    assert f"--config {cfg}: {message}" in capsys.readouterr().err
    cfg.write_text('{"epochs": 2}')  # a config file that gave something else
    flags = [a for k, v in values.items()
             for a in ["--" + k.replace("_", "-"), *([] if v is True else [str(path(v, v))])]]
    assert main([*run, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "--config" not in err, err
    assert not (tmp_path / "o").exists()
