"""Run by test_integrations under torchrun: POET with accelerate on two CPU processes (gloo).

Each rank trains on its own batches; DDP averages the gradients; MergeSchedule merges every 2 steps.
Writes, from rank 0, the largest difference between the ranks of any parameter or buffer.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import poetlm
from poetlm.integrations import MergeSchedule

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))
poetlm.poetize(model, poetlm.POETConfig(block_size=8, merge_every=2))
optimizer = torch.optim.AdamW(poetlm.param_groups(model, lr_base=1e-2, lr_poet=1e-2, weight_decay=0.01))
model, optimizer = accelerator.prepare(model, optimizer)
schedule = MergeSchedule(model, optimizer, max_grad_norm=1.0)
clips = []
for step in range(6):
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(100 * step + accelerator.process_index))
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    clips.append(schedule.clip_value())
    accelerator.clip_grad_norm_(model.parameters(), clips[-1])
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()

state = accelerator.unwrap_model(model).state_dict()
sums = torch.stack([t.double().sum() for t in state.values() if t.is_floating_point() or t.dtype == torch.long])
gathered = accelerator.gather(sums.unsqueeze(0))
if accelerator.is_main_process:
    merges = sorted({int(layer.merge_count) for _, layer in poetlm.poet_layers(model)})
    result = {"divergence": float((gathered - gathered[0]).abs().max()), "merges": merges, "clips": clips,
              "world_size": accelerator.num_processes, "rotation_state": sum(p in optimizer.state for p in poetlm.rotation_parameters(model))}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
accelerator.wait_for_everyone()  # rank 0 wrote the file
# Not the interpreter's teardown: gloo's threads have aborted it ("terminate called without an active exception",
# exit -6) after the result was written, in about one full-suite run in five. What this test checks is written;
# poetlm's own loop tears its process group down in step (parallel.teardown), tested by test_distributed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
