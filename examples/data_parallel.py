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

import optree

import functional_memopt as fm
from functional_memopt import testing

parser = argparse.ArgumentParser()
parser.add_argument("--zero-stage", type=int, default=2)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--run-dir", help="checkpoint folder, seen by every rank (default: a temporary one for a single "
                    "process, runs/data_parallel_example under torchrun)")
args = parser.parse_args()

info = fm.init_distributed(timeout_s=120)  # rank, world size and device from torchrun's environment
cfg = fm.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
opt = fm.adamw(1e-3, weight_decay=0.1, mask=fm.decay_mask)
# One way in: the same step, state and checkpoints, with parallel=. check_replicas asserts after
# every update that all ranks hold bit-identical params (a debugging aid).
par = fm.data_parallel(zero_stage=args.zero_stage, check_replicas=True)
policy = "mixed_bf16" if info.device.type == "cuda" else "fp32"
state = fm.init_train_state(fm.init_params(cfg, device=info.device), opt, policy=policy, parallel=par)
step = fm.make_train_step(cfg, opt, policy=policy, accum_steps=2, max_grad_norm=1.0, donate=True, parallel=par)

data = fm.load_corpus()
global_rows = 8 * info.world_size  # 8 rows per rank, 2 micro-batches of 4
for i in range(args.steps):
    batch = fm.sample_batch(data, global_rows, 64, seed=0, index=i, device=info.device)
    state, metrics = step(state, fm.shard_batch(batch, info.rank, info.world_size))
    if info.is_main and (i % 5 == 0 or i == args.steps - 1):
        print(f"step {i}: loss {float(metrics['loss']):.3f} over {int(metrics['tokens'])} tokens of all ranks")

opt_bytes = sum(x.numel() * x.element_size() for x in optree.tree_leaves(state.opt_state))
print(f"rank {info.rank}: optimizer state {opt_bytes / 1e6:.2f} MB (ZeRO stage {args.zero_stage})")

run_dir = args.run_dir or (tempfile.mkdtemp() if info.world_size == 1 else os.path.join("runs", "data_parallel_example"))
if info.is_main:  # only rank 0 writes; the others read the folder (shared here: one machine)
    os.makedirs(run_dir, exist_ok=True)
fm.save_checkpoint(run_dir, state, cfg=cfg, meta={"next_batch": args.steps}, parallel=par, optimizer=opt)
resumed, meta = fm.load_checkpoint(run_dir, state, cfg=cfg, parallel=par, optimizer=opt)
assert meta["next_batch"] == args.steps and int(resumed.step) == int(state.step)
testing.assert_trees_equal(resumed, state)
if info.is_main:
    print(f"checkpoint in {run_dir} reloaded bit for bit")
fm.shutdown_distributed()
if info.is_main:
    print("OK")
