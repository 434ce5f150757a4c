#!/usr/bin/env bash
# One short check for a CUDA machine (about 5 minutes on one H100/H200; every GPU of the machine is used):
#   1. the training loops' FSDP2 + bf16 path on CUDA: one step's gradients against one fp32 device;
#   2. `torchrun ... -m aligntok dit train` with FSDP2 + bf16 on NCCL, saving and resuming a DCP state;
#   3. DiT-B/1 and DiT-XL/1 training throughput (images/s), MFU and peak memory (FSDP2, +AC, +compile, DDP).
# Writes benchmarks/results/gpu_check.json (and .log); the numbers go into docs/results.md.
# Needs a CUDA build of torch and this package importable (pip install -e . or PYTHONPATH=src); no assets.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
NPROC="${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$NPROC" -lt 1 ]; then echo "gpu_check.sh: no CUDA device" >&2; exit 1; fi
RUN="$PY -m torch.distributed.run --standalone --nproc-per-node $NPROC"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p benchmarks/results
exec > >(tee benchmarks/results/gpu_check.log) 2>&1

echo "== 2. torchrun dit train, FSDP2 + bf16, on a synthetic latent cache; then --resume"
"$PY" - "$WORK/cache" <<'PY'
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[1]); out.mkdir()
g = torch.Generator().manual_seed(0)
n, shape = 512, (32, 16, 16)
save_file({"latents": torch.randn(n, *shape, generator=g), "labels": torch.randint(0, 10, (n,), generator=g),
           "indices": torch.arange(n), "flipped": torch.zeros(n, dtype=torch.uint8)}, str(out / "shard-00000.safetensors"))
meta = {"tokenizer": {"path": "synthetic", "hash": "synthetic"}, "data": "synthetic", "split": "train", "flip": False,
        "num_shards": 1, "latent_shape": list(shape), "classes": [str(i) for i in range(10)],
        "mean": [0.0] * 32, "std": [1.0] * 32}
(out / "meta.json").write_text(json.dumps(meta))
PY
SETS=(--set model=B/1 --set batch_size=$((32 * NPROC)) --set ckpt_every=10 --set log_every=10 --set bf16=true --set parallel.mode=fsdp)
$RUN -m aligntok dit train --recipe debug --latents "$WORK/cache" --out "$WORK/run" "${SETS[@]}" --set steps=20
test -f "$WORK/run/checkpoints/step-0000020/train_state.pt" && test -f "$WORK/run/export/model.safetensors"
# Resuming the finished run loads its sharded DCP state on NCCL and exports again.
$RUN -m aligntok dit train --recipe debug --latents "$WORK/cache" --out "$WORK/run" "${SETS[@]}" --set steps=20 \
  --resume | tee "$WORK/resume.out"
grep -q "resumed $WORK/run at step 20" "$WORK/resume.out"
"$PY" - "$WORK" <<'PY'
import json, math, sys
from pathlib import Path
log = [json.loads(l) for l in (Path(sys.argv[1]) / "run" / "log.jsonl").read_text().splitlines()]
assert all(math.isfinite(r["loss"]) for r in log), log
print("dit train under torchrun (FSDP2 + bf16): losses", [round(r["loss"], 4) for r in log])
PY

echo "== 1 + 3. FSDP2 + bf16 gradient check, then throughput"
$RUN benchmarks/dit_throughput.py --check --out benchmarks/results/gpu_check.json
"$PY" - <<'PY'
import json
r = json.load(open("benchmarks/results/gpu_check.json"))
assert r["check"]["ok"], r["check"]
print("gpu_check.sh: all checks passed")
PY
