"""Data parallel training with a sharded optimizer (ZeRO), on CPU ranks (gloo) or GPUs (NCCL).

Run:
    torchrun --nproc_per_node=2 examples/data_parallel.py [--zero-stage 2] [--steps 20] [--run-dir runs/dp]

Every rank builds the same global batch and keeps its rows; the step all-reduces the token count,
folds the rank's micro-batches and reduce-scatters the gradients; each rank updates its slice of
the params with its slice of the AdamW state and all-gathers the params. At the end the full state
is gathered into a checkpoint that any number of ranks (or one process) can resume.
"""

import argparse
import os
import tempfile

import functional_memopt as fm
from functional_memopt import testing
from functional_memopt._distributed import (
    init_data_parallel_state,
    load_distributed_checkpoint,
    make_data_parallel_step,
    save_distributed_checkpoint,
    shard_batch,
)
from functional_memopt._optim import adamw, decay_mask
from functional_memopt._process_group import assert_replicas_equal, init_distributed, shutdown_distributed
from functional_memopt._zero import data_parallel

parser = argparse.ArgumentParser()
parser.add_argument("--zero-stage", type=int, default=2)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--run-dir", help="checkpoint folder, seen by every rank (default: a temporary one for a single "
                    "process, runs/data_parallel_example under torchrun)")
args = parser.parse_args()

info = init_distributed(timeout_s=120)  # rank, world size and device from torchrun's environment
cfg = fm.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
opt = adamw(1e-3, weight_decay=0.1, mask=decay_mask)
par = data_parallel(zero_stage=args.zero_stage)
policy = "mixed_bf16" if info.device.type == "cuda" else "fp32"
state = init_data_parallel_state(fm.init_params(cfg, device=info.device), opt, par, policy=policy)
step = make_data_parallel_step(cfg, opt, par, policy=policy, accum_steps=2, max_grad_norm=1.0, donate=True)

data = fm.load_corpus()
global_rows = 8 * info.world_size  # 8 rows per rank, 2 micro-batches of 4
for i in range(args.steps):
    batch = fm.sample_batch(data, global_rows, 64, seed=0, index=i, device=info.device)
    state, metrics = step(state, shard_batch(batch, info.rank, info.world_size))
    if info.is_main and (i % 5 == 0 or i == args.steps - 1):
        print(f"step {i}: loss {float(metrics['loss']):.3f} over {int(metrics['tokens'])} tokens of all ranks")

assert_replicas_equal(state.params)  # every rank holds the same params
print(f"rank {info.rank}: optimizer state {fm.tree_bytes(state.opt_state) / 1e6:.2f} MB (ZeRO stage {args.zero_stage})")

run_dir = args.run_dir or (tempfile.mkdtemp() if info.world_size == 1 else os.path.join("runs", "data_parallel_example"))
if info.is_main:  # only rank 0 writes; the others read the folder (shared here: one machine)
    os.makedirs(run_dir, exist_ok=True)
save_distributed_checkpoint(run_dir, state, opt, par, cfg=cfg, meta={"next_batch": args.steps})
resumed, meta = load_distributed_checkpoint(run_dir, state, opt, par, cfg=cfg)
assert meta["next_batch"] == args.steps and int(resumed.step) == int(state.step)
testing.assert_trees_equal(resumed, state)
if info.is_main:
    print(f"checkpoint in {run_dir} reloaded bit for bit")
shutdown_distributed()
if info.is_main:
    print("OK")
