#!/usr/bin/env bash
# The adaptation story from the real-data model: light tuning on the Fashion-MNIST validation split (seed 0),
# settings picked by validation top-1, then seeds 0 1 2 on the test split with those settings.
set -e
cd /work/wt/s4-adapt
M=/work/artifacts/s4-adapt/start.safetensors
A=/work/artifacts/s4-adapt
B="--before zeroshot:openclipart retrieval:openclipart"
date -u +"tune start %T"
python scripts/adaptation_report.py --model $M --seeds 0 --target-split val $B --cache $A/features \
  --head-lr 0.001 0.01 0.1 --lora-lr 1e-3 --full-lr 1e-5 --output $A/tune-a.json --runs-dir $A/tune-a
python scripts/adaptation_report.py --model $M --seeds 0 --target-split val $B --cache $A/features \
  --head-lr 0.001 --lora-lr 1e-2 --full-lr 1e-4 --output $A/tune-b.json --runs-dir $A/tune-b
date -u +"tune end %T"
read HEAD LORA FULL < <(python - <<'PY'
import json
a = json.load(open("/work/artifacts/s4-adapt/tune-a.json"))["seeds"][0]["target"]
b = json.load(open("/work/artifacts/s4-adapt/tune-b.json"))["seeds"][0]["target"]
heads = {lr: a[f"zero-shot-init head (lr {lr:g})"] for lr in (0.001, 0.01, 0.1)}
head = max(heads, key=heads.get)
lora = 1e-3 if a["LoRA"] >= b["LoRA"] else 1e-2
full = 1e-5 if a["full fine-tuning"] >= b["full fine-tuning"] else 1e-4
print(head, lora, full)
PY
)
echo "picked head lr $HEAD, LoRA lr $LORA, full lr $FULL"
python scripts/adaptation_report.py --model $M --seeds 0 1 2 $B --cache $A/features \
  --head-lr $HEAD --lora-lr $LORA --full-lr $FULL --output $A/adaptation.json --runs-dir $A/story \
  --figure $A/wiseft-sweep.png
date -u +"story end %T"
