"""A memory of training-caption text embeddings: nearest-neighbour search and DeCap projection.

Two later methods use such a memory ``M`` (n captions, d dims, L2-normalised rows):

- **DeCap** (ICLR 2023) replaces an image embedding ``v`` by its projection into the text cone,
  ``normalize(Σ_i softmax(cos(v, M) / τ)_i · M_i)`` with ``τ ≈ 0.01`` (:meth:`TextMemory.project`).
- **IFCap** (EMNLP 2024) retrieves the k nearest training captions of a noised text embedding during
  training (excluding the caption itself) and of the image embedding at inference, and fuses them with
  the query (:meth:`TextMemory.search`, :meth:`TextMemory.neighbours`, :meth:`TextMemory.gather`).

::

    memory = TextMemory.from_store("stores/coco-train")          # memory-mapped, nothing copied or kept resident
    scores, idx = memory.search(image_emb, k=5)                   # (b, 5) cosines, (b, 5) row indices
    v = memory.project(image_emb, tau=0.01)                       # (b, d), exact over all n
    v = memory.project(image_emb, tau=0.01, k=256)                # softmax over the top 256 only
    memory.save("memories/coco-train")                            # meta.json naming the store (+ faiss index)

The package, one reason to change each:

- :mod:`~capdec.memory.kernels`: exact top-k search and projection, pure torch over chunks of the rows
  (and why top-k projection is safe);
- :mod:`~capdec.memory.faiss_index`: faiss indexes (``backend="faiss"``: exact ``flat``, approximate ``ivf``
  holding the rows, or approximate ``ivfpq`` holding d/16-byte codes whose candidates are re-scored
  exactly from the rows: for memories larger than RAM), optional;
- :mod:`~capdec.memory.persistence`: the directory format (an index over an embedding store);
- :mod:`~capdec.memory.text_memory`: :class:`TextMemory`, which holds rows, captions and search settings.
"""

from __future__ import annotations

from capdec.configs import MemoryConfig
from capdec.memory.faiss_index import build_faiss_index, default_nlist, faiss_available, faiss_topk
from capdec.memory.kernels import cosine_topk, project_candidates, project_exact, topk_mass_bound
from capdec.memory.persistence import FORMAT
from capdec.memory.text_memory import AUTO_IVF_MIN_ROWS, TextMemory

__all__ = ["AUTO_IVF_MIN_ROWS", "FORMAT", "MemoryConfig", "TextMemory", "build_faiss_index", "cosine_topk",
           "default_nlist", "faiss_available", "faiss_topk", "project_candidates", "project_exact",
           "topk_mass_bound"]
