"""Fine-tune a Hugging Face GPT-2 directory with a functional step, and hand it back to transformers.

Run:
    python examples/finetune_gpt2.py

No download: the "pretrained" GPT-2 is a small random one that transformers builds and saves
locally, exactly as `save_pretrained` lays out any GPT-2 directory. Point `load_gpt2` at a real
GPT-2 directory and the same code fine-tunes it (with its 50257-token vocabulary; the byte ids used
here are valid GPT-2 ids too, but a real run would use GPT-2's tokenizer).
"""

import math
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import functional_memopt as fm

# Only this script's own lines: transformers' warnings and its progress bars off, through its own switches.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

torch.manual_seed(0)
work = Path(tempfile.mkdtemp())
# A byte vocabulary has no id 50256, GPT-2's <|endoftext|>: no bos/eos ids, as save_gpt2 writes them.
hf_config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=None,
                       eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
GPT2LMHeadModel(hf_config).save_pretrained(work / "gpt2-small-random")

params, cfg = fm.load_gpt2(work / "gpt2-small-random")  # fp32 masters, tied head, fused QKV
print(f"loaded {cfg.n_layer}-layer GPT-2, {sum(math.prod(shape) for shape in fm.param_shapes(cfg).values()):,} params")

train, val = fm.train_val_split(fm.load_corpus())
optimizer = fm.adamw(fm.warmup_cosine(2e-3, 5, 60), weight_decay=0.1, mask=fm.decay_mask)
step = fm.make_train_step(cfg, optimizer, policy="mixed_bf16", accum_steps=2, max_grad_norm=1.0)
state = fm.init_train_state(params, optimizer)


def val_loss(p):
    b = fm.sample_batch(val, 16, cfg.block_size, seed=1, index=0)
    s, c = fm.loss_fn(p, b.tokens, b.targets, cfg)
    return float(s / c)


before = val_loss(state.params)
for i in range(60):
    state, m = step(state, fm.sample_batch(train, 16, cfg.block_size, seed=0, index=i))
after = val_loss(state.params)
print(f"validation loss: {before:.3f} -> {after:.3f} nats/token ({after / math.log(2):.2f} bits/byte)")

fm.save_gpt2(work / "finetuned", state.params, cfg)
hf = GPT2LMHeadModel.from_pretrained(work / "finetuned").eval()
tokens = fm.sample_batch(val, 2, cfg.block_size, seed=2, index=0).tokens
with torch.no_grad():
    diff = (hf(tokens).logits - fm.apply(state.params, tokens, cfg)).abs().max().item()
print(f"transformers reloads the fine-tuned model: max logit difference {diff:.2e}")
assert after < before - 0.5 and diff < 1e-4
print("OK")
