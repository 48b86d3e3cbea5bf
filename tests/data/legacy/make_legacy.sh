#!/usr/bin/env bash
# Writes the legacy fixtures with the PRE-restructure code (/work/base).
set -euo pipefail
export OMP_NUM_THREADS=1 PYTHONPATH=/work/base/src
PY=/work/main/.venv/bin/python
OUT=$(realpath -m "${1:?out dir}")
mkdir -p "$OUT/images"
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from capdec import toyworld
out = Path(sys.argv[1])
(out / "corpus.txt").write_text("\n".join(toyworld.corpus(80, seed=0)) + "\n")
images, refs = toyworld.test_set(6, seed=0)
with open(out / "pairs.jsonl", "w") as f:
    for i, (im, caps) in enumerate(zip(images, refs)):
        im.save(out / "images" / f"toy_{i}.png")
        f.write(json.dumps({"image": f"images/toy_{i}.png", "caption": caps[0]}) + "\n")
PYEOF
cd "$OUT"
$PY -m capdec -q embed corpus.txt --out store --encoder toy
$PY -m capdec -q train store --out checkpoint --epochs 15 --batch-size 16 --lr 1e-2 --dropout 0 --save-memory \
  --prefix-length 4 --mapper-depth 1 --mapper-heads 2 --max-length 16 --lm-dim 16 --lm-depth 2 --lm-heads 2 --vocab-size 200 --seed 0
$PY -m capdec -q calibrate pairs.jsonl --encoder toy --out noise.json
$PY -m capdec -q caption checkpoint images --strategy greedy --out captions_greedy.jsonl
$PY -m capdec -q caption checkpoint images --strategy greedy --project --out captions_greedy_project.jsonl
PYTHONPATH= git -C /work/base log -1 --format='%H %s' > made_by_commit.txt
# a sharp numerical signature of checkpoint + encoder + tokenizer: each image's caption loss
$PY - <<'PYEOF'
import json
import torch
from capdec.caption import Captioner
from capdec.images import load_image
cap = Captioner.from_pretrained("checkpoint", device="cpu")
pairs = [json.loads(l) for l in open("pairs.jsonl")]
emb = cap.embed_images([load_image(p["image"]) for p in pairs])
model = cap.model.eval()
losses = []
with torch.no_grad():
    for i, p in enumerate(pairs):
        ids, mask, _ = model.tokenize([p["caption"]])
        losses.append(float(model(cap.prepare(emb[i : i + 1]), ids, mask)))
json.dump({"caption_losses": losses, "image_embedding_0_first8": emb[0, :8].tolist()}, open("reference_outputs.json", "w"), indent=1)
PYEOF
