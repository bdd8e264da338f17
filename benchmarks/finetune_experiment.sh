#!/usr/bin/env bash
# The finetuning experiment of docs/finetuning.md, end to end:
#   1. pretrain the `tiny` preset with AdamW on sotu and export it (the base model);
#   2. finetune the base on shakespeare with POET, LoRA (r=8) and full finetuning (AdamW),
#      same steps, batch size and sequence length;
#   3. score every model on the shakespeare validation split (adaptation) and on the pretraining
#      sotu validation split (forgetting), and write OUT_DIR/results.md.
#
# usage: benchmarks/finetune_experiment.sh OUT_DIR [FINETUNE_STEPS]
#   env: PRETRAIN_STEPS (1000 = the tiny preset), PRETRAIN_LR (3e-3), POET_LR (2e-3 = the finetune preset's optim.lr_poet),
#        LORA_LR (1e-3), FULL_LR (1e-4), EVAL_TOKENS (32768)
# Everything (runs, exported models, logs) goes under OUT_DIR (the token cache is data.cache_dir, ~/.cache/poetlm):
# the commands run with OUT_DIR as the working directory. Needs the poetlm venv active.
# Rerunning with the same OUT_DIR skips the steps that finished (logs/STEP.wall exists).
set -euo pipefail

OUT=${1:?usage: benchmarks/finetune_experiment.sh OUT_DIR [FINETUNE_STEPS]}
STEPS=${2:-200}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}
PRETRAIN_LR=${PRETRAIN_LR:-3e-3}
POET_LR=${POET_LR:-2e-3}
LORA_LR=${LORA_LR:-1e-3}
FULL_LR=${FULL_LR:-1e-4}
EVAL_TOKENS=${EVAL_TOKENS:-32768}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$OUT"
mkdir -p logs evals
log() { echo "[$(date +%H:%M:%S)] $*"; }
timed() {  # timed NAME CMD...: run, log to logs/NAME.log, record the wall time in logs/NAME.wall
  local name=$1; shift
  if [[ -f "logs/$name.wall" ]]; then log "$name: done before, skipped"; return; fi  # rerun = resume
  rm -rf "runs/${name/pretrain/base-adamw}"  # a half-written run of an interrupted earlier call
  log "$name: $*"
  local start=$SECONDS
  "$@" > "logs/$name.log" 2>&1 || { echo "failed, see $OUT/logs/$name.log" >&2; tail -20 "logs/$name.log" >&2; exit 1; }
  echo $((SECONDS - start)) > "logs/$name.wall"
}
# Every perplexity below uses the same windows: the first EVAL_TOKENS predicted tokens of the
# validation split in seq_len-128 windows (what the runs themselves evaluate during training).
evaluate() {  # evaluate NAME PATH CORPUS
  local name=$1 path=$2 corpus=$3
  if [[ -s "evals/$name.$corpus.txt" ]]; then return; fi
  poetlm eval "$path" --data "$corpus" --tokens "$EVAL_TOKENS" --seq-len 128 > "evals/$name.$corpus.txt" 2>"logs/eval-$name.$corpus.log"
  log "eval $name on $corpus: $(cat "evals/$name.$corpus.txt")"
}

# 1. The base: tiny preset (1000 steps, batch 16, seq_len 128), AdamW, sotu; then a plain HF directory.
timed pretrain poetlm train --method adamw --name base-adamw --out runs --no-progress "steps=$PRETRAIN_STEPS" "optim.lr=$PRETRAIN_LR"
timed export poetlm export runs/base-adamw base
evaluate base base sotu          # exported dir: val_fraction 0.05, split seed 0 = the pretraining split
evaluate base base shakespeare

# 2. Finetunes on shakespeare. All three: finetune preset (batch 16, seq_len 128, 10 warmup steps,
#    cosine to 0.1x, clip 1.0, seed 0), STEPS steps. POET: POET-BS b=32, merge every 50, init="keep".
FT=(--model "$OUT/base" --data shakespeare --steps "$STEPS" --out runs --no-progress)
timed ft-poet  poetlm finetune "${FT[@]}" --method poet  --name ft-poet  "optim.lr_poet=$POET_LR"
timed ft-lora  poetlm finetune "${FT[@]}" --method lora  --name ft-lora  "optim.lr=$LORA_LR" finetune.lora_rank=8 finetune.lora_alpha=16.0
timed ft-adamw poetlm finetune "${FT[@]}" --method adamw --name ft-adamw "optim.lr=$FULL_LR"

# 3. Forgetting: each finetuned run on sotu. `poetlm eval RUN --data sotu` splits sotu with the run's
#    data.val_fraction (0.05) and the run's seed (0) as split seed: the same as the pretraining run,
#    whose seed is 0 too; the tokenizer is the run's own (= the base's).
for m in poet lora adamw; do
  evaluate "ft-$m" "runs/ft-$m" sotu
  evaluate "ft-$m" "runs/ft-$m" shakespeare
done

# Checks: the POET adapter rebuilds the run on a fresh base, a wrong base is refused, and the
# exported dense model scores the same as the run.
timed export-poet poetlm export runs/ft-poet ft-poet-merged
evaluate ft-poet-merged ft-poet-merged shakespeare
python - "$OUT" > evals/adapter-check.txt 2>logs/adapter-check.log <<'EOF'
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from poetlm.adapter import AdapterError, load_adapter
from poetlm.train.runs import load_run_model

out = Path(sys.argv[1])
run, _, _ = load_run_model(out / "runs/ft-poet")
model = load_adapter(AutoModelForCausalLM.from_pretrained(out / "base"), out / "runs/ft-poet/adapter.safetensors").eval()
ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    diff = (model(input_ids=ids).logits - run(input_ids=ids).logits).abs().max().item()
print(f"adapter on a fresh base vs the run's checkpoint: max |logit diff| = {diff:.2e}")
try:
    load_adapter(AutoModelForCausalLM.from_pretrained(out / "ft-poet-merged"), out / "runs/ft-poet/adapter.safetensors")
    print("wrong base: NOT refused")
except AdapterError as error:
    print(f"wrong base (the merged model) refused: AdapterError: {str(error)[:160]}...")
EOF
log "$(cat evals/adapter-check.txt)"

# Step time, measured fairly: the three finetuning setups built in one process and stepped
# round-robin (rotating start; median over rounds), so a busy shared machine slows all of them alike.
# One step = poetlm's own train_step (batch 16 x 128, forward, backward, clip, AdamW) on random tokens.
python - "$OUT" > evals/step-time.json 2>logs/step-time.log <<'EOF_TIMING'
import json, statistics, sys, time
import numpy as np, torch
from types import SimpleNamespace
from poetlm.train import distributed
from poetlm.train.config import resolve_config
from poetlm.train.loop import TrainState, train_step
from poetlm.train.methods import make_method
from poetlm.train.models import load_model

out, rounds = sys.argv[1], 12
runtime = distributed.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
data = SimpleNamespace(train=np.random.default_rng(0).integers(0, 4096, 1_000_000).astype(np.uint16))
lrs = {"poet": "optim.lr_poet=2e-3", "lora": "optim.lr=1e-3", "adamw": "optim.lr=1e-4"}
setups = {}
for method, lr in lrs.items():
    config = resolve_config("finetune", [f"finetune.base_model={out}/base", f"method={method!r}", lr])
    trainer = make_method(config)
    model = trainer.prepare(load_model(config, 4096))
    setups[method] = (trainer, model, trainer.optimizers(model), config, TrainState())
times = {m: [] for m in setups}
for r in range(rounds + 3):
    order = list(setups)[r % 3:] + list(setups)[: r % 3]
    for m in order:
        trainer, model, optimizers, config, state = setups[m]
        start = time.perf_counter()
        train_step(trainer, model, model, optimizers, data, config, state, runtime, None)
        state.step += 1
        if r >= 3:  # warmup rounds left out
            times[m].append(time.perf_counter() - start)
print(json.dumps({m: {"median_s": statistics.median(t), "tokens_per_s": 16 * 128 / statistics.median(t)} for m, t in times.items()}))
EOF_TIMING
log "step time: $(cat evals/step-time.json)"

# Table.
python - "$OUT" "$STEPS" > results.md <<'EOF'
import json, re, sys
from pathlib import Path

out, steps = Path(sys.argv[1]), sys.argv[2]
def ppl(name, corpus):
    return float(re.search(r"perplexity: ([0-9.]+)", (out / f"evals/{name}.{corpus}.txt").read_text()).group(1))
def wall(name):
    return int((out / f"logs/{name}.wall").read_text())

base_cfg = json.loads((out / "runs/base-adamw/config.json").read_text())
base_step = max(int(p.stem.split("_")[1]) for p in (out / "runs/base-adamw/checkpoints").glob("step_*.pt"))
print(f"Base: tiny preset, AdamW lr {base_cfg['optim']['lr']:g}, sotu, checkpoint of step {base_step} "
      f"(schedule of {base_cfg['steps']} steps), {wall('pretrain')} s wall\n")
print(f"Finetuning on shakespeare, {steps} steps x 16 x 128 tokens each.\n")
timing = json.loads((out / "evals/step-time.json").read_text())
print("| method | lr | trainable params | of which block linears | shakespeare val ppl before → after | sotu val ppl before → after | s/step (interleaved) | tokens/s (interleaved) | tokens/s in the run | wall s of the run |")
print("| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
print(f"| base (no finetuning) | – | – | – | {ppl('base', 'shakespeare'):.2f} | {ppl('base', 'sotu'):.2f} | – | – | – | – |")
for m in ("poet", "lora", "adamw"):
    s = json.loads((out / f"runs/ft-{m}/summary.json").read_text())
    c = json.loads((out / f"runs/ft-{m}/config.json").read_text())
    lr = c["optim"]["lr_poet"] if m == "poet" else c["optim"]["lr"]
    label = {"poet": "POET-BS (b=32)", "lora": f"LoRA (r={c['finetune']['lora_rank']})", "adamw": "full (AdamW)"}[m]
    print(f"| {label} | {lr:g} | {s['trainable_params']:,} | {s['block_linear_trainable_params']:,} | "
          f"{s['initial_val_ppl']:.2f} → {s['final_val_ppl']:.2f} | {ppl('base', 'sotu'):.2f} → {ppl(f'ft-{m}', 'sotu'):.2f} | "
          f"{timing[m]['median_s']:.3f} | {timing[m]['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | {wall(f'ft-{m}')} |")
print(f"\nPOET merged export on shakespeare: {ppl('ft-poet-merged', 'shakespeare'):.2f} "
      f"(run: {ppl('ft-poet', 'shakespeare'):.2f})")
print((out / "evals/adapter-check.txt").read_text().strip().replace("\n", "  \n"))
EOF
cat results.md
