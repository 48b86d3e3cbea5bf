"""capdec's lab: how we *measure* the product, kept apart from it.

The product (everything in :mod:`capdec` outside this package) is the pipeline a user runs on real
data; the lab builds on it and is never imported by it (``tests/test_layout.py`` checks):

- :mod:`capdec.lab.toyworld`: procedurally rendered scenes, a caption grammar, the mini-CLIP's
  training (the model itself is the core's ``toy`` encoder, :mod:`capdec.encoders.miniclip`);
- :mod:`capdec.lab.experiment`: one toy-world run (corpus -> store -> train -> caption -> metrics);
- :mod:`capdec.lab.demo`: ``capdec demo`` (baselines, methods, ablations on the toy world);
- :mod:`capdec.lab.sweep`: ``capdec sweep`` (noise-level sweeps);
- :mod:`capdec.lab.transfer`: styled captions and cross-domain transfer;
- :mod:`capdec.lab.report`: the markdown tables the lab writes.
"""
