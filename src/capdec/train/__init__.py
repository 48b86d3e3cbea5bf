"""Text-only CapDec training: embedding store(s) -> checkpoint, in three steps, one module each.

- :mod:`capdec.train.plan`: :func:`plan_training` decides the whole run (every option from its source:
  flag, config file, noise file, recipe, checkpoint, store, default; every derived value) and returns a
  :class:`TrainPlan`, which ``capdec train --dry-run`` prints;
- :mod:`capdec.train.schedule`: pure functions of the options and the step (learning rate, data order,
  validation split, the derived :class:`Schedule`);
- :mod:`capdec.train.loop`: :func:`run_training` carries a plan out (model, optimiser, steps, saves).

``train(stores, out_dir, ...)`` is ``run_training(plan_training(stores, out_dir, ...))``.
"""

from capdec.configs import TrainConfig
from capdec.textdata import TextData, load_text_data
from capdec.train.loop import (
    TrainResult,
    amp_dtype,
    cpu_has_bf16,
    evaluate_loss,
    make_optimizer,
    run_training,
    sibling,
    train,
)
from capdec.train.plan import Split, TrainPlan, plan_training
from capdec.train.schedule import (
    Schedule,
    bucket_batches,
    default_lr,
    derive_schedule,
    epoch_order,
    lr_at,
    split_indices,
    step_seed,
)

__all__ = ["Schedule", "Split", "TextData", "TrainConfig", "TrainPlan", "TrainResult", "amp_dtype", "bucket_batches",
           "cpu_has_bf16", "default_lr", "derive_schedule", "epoch_order", "evaluate_loss", "load_text_data", "lr_at",
           "make_optimizer", "plan_training", "run_training", "sibling", "split_indices", "step_seed", "train"]
