#!/usr/bin/env bash
# Writes the legacy fixtures with the PRE-restructure code (commit 72b6fb376874):
#   git worktree add --detach OLD 72b6fb376874
#   PYTHON=.venv/bin/python bash tests/data/legacy/make_legacy.sh OUT OLD
# The decoder is trained enough (1,000 captions, 20 epochs) that its greedy captions of the six test
# images all differ: the recorded captions then pin how images reach the decoder, not just the checkpoint.
set -euo pipefail
OUT=$(realpath -m "${1:?out dir}")
OLD=$(realpath "${2:?checkout of the old code}")
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1 PYTHONPATH="$OLD/src"
mkdir -p "$OUT/images"
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from capdec import toyworld
out = Path(sys.argv[1])
(out / "corpus.txt").write_text("\n".join(toyworld.corpus(1000, seed=0)) + "\n")
images, refs = toyworld.test_set(6, seed=0)
with open(out / "pairs.jsonl", "w") as f:
    for i, (im, caps) in enumerate(zip(images, refs)):
        im.save(out / "images" / f"toy_{i}.png")
        f.write(json.dumps({"image": f"images/toy_{i}.png", "caption": caps[0]}) + "\n")
PYEOF
cd "$OUT"
$PY -m capdec -q embed corpus.txt --out store --encoder toy
$PY -m capdec -q train store --out checkpoint --epochs 20 --batch-size 32 --lr 1e-2 --dropout 0 --save-memory \
  --noise-variance 0.008 --prefix-length 4 --mapper-depth 1 --mapper-heads 2 --max-length 40 --lm-dim 32 \
  --lm-depth 2 --lm-heads 2 --vocab-size 400 --seed 0
$PY -m capdec -q calibrate pairs.jsonl --encoder toy --out noise.json
$PY -m capdec -q caption checkpoint images --strategy greedy --out captions_greedy.jsonl
$PY -m capdec -q caption checkpoint images --strategy greedy --project --out captions_greedy_project.jsonl
git -C "$OLD" log -1 --format='%H %s' > made_by_commit.txt
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
