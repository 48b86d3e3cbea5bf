"""The lab's constants that its commands' ``--help`` shows, in a torch-free module.

``capdec demo --help`` and ``capdec sweep --help`` read them from here, so building those parsers
imports neither the experiment harness nor torch; :mod:`capdec.lab.demo` and :mod:`capdec.lab.sweep`
re-export them.
"""

from __future__ import annotations

# capdec demo --methods: the later methods the demo can add to CapDec (described in capdec.lab.demo)
METHODS = ("gap", "gap_projection", "projection", "capdec_projection", "centering", "retrieval",
           "retrieval_projection", "ifcap", "gap_ifcap", "gap_pseudo")
# capdec sweep --variances: noise variances ε² trained by default (0 = no noise; 1.6e-2 is the paper's)
DEFAULT_VARIANCES = (0.0, 1e-3, 4e-3, 1.6e-2, 4e-2, 1e-1)
TOY_CALIBRATION_SEED = 123  # the scenes calibrate_toy draws its pairs from (train split)
