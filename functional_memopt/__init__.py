"""functional_memopt: memory optimisations for training transformer LMs, written in the style of JAX.

The model is pure functions over a parameter pytree and a training step is one pure function
composed of transformations. Gradients come from ``torch.autograd.grad`` over the pure loss by
default (``torch.func`` differentiates with ``create_graph=True`` and kept 1.7x the peak memory);
``torch.func`` runs remat's recompute and is an opt-in engine (``engine="func"``).

This module's ``__all__`` is the public surface, grouped by layer (folders of the package, top to
bottom: app > parallel, memory > io, train > optim > model > data). The test kit is the public
module ``functional_memopt.testing``; everything else is internal.
"""

from ._version import __version__ as __version__

# data: bytes as tokens, the built-in corpus, batches with masks
from .data.batch import IGNORE_INDEX as IGNORE_INDEX  # targets not counted by the loss
from .data.batch import Batch as Batch  # tokens, targets, loss mask, attention mask, segment ids
from .data.batch import pack_documents as pack_documents  # whole documents packed into rows
from .data.batch import pad_sequences as pad_sequences  # ragged sequences right-padded and masked
from .data.batch import sample_batch as sample_batch  # batch number i of random windows, by (seed, i)
from .data.batch import split_microbatches as split_microbatches  # a batch split along rows
from .data.corpus import load_corpus as load_corpus  # the built-in corpus or your text files, as ids
from .data.corpus import train_val_split as train_val_split  # the first 90% trains, the rest validates
from .data.tokens import decode as decode  # byte ids to text
from .data.tokens import encode as encode  # text to byte ids

# model: config, parameters and the pure forward
from .model.attention import attention_kernel as attention_kernel  # the attention kernel "auto" picks
from .model.attention import causal_attention as causal_attention  # fused-QKV attention with masks
from .model.gpt import activate as activate  # the MLP's GELU (GPT-2's fused for compiled CPU code)
from .model.config import PRESETS as PRESETS  # named model shapes (tiny, small, gpt2, ...)
from .model.config import ModelConfig as ModelConfig  # a frozen, validated model shape
from .model.config import get_config as get_config  # a preset, with overrides
from .model.generate import generate as generate  # seeded sampling from a prompt
from .model.gpt import apply as apply  # logits of a pure model: apply(params, tokens, cfg)
from .model.gpt import loss_fn as loss_fn  # summed token cross-entropy and the count of tokens
from .model.layout import init_params as init_params  # fresh params, GPT-2's initialisation
from .model.layout import param_shapes as param_shapes  # the {path: shape} of a config's params
from .model.remat import remat as remat  # rematerialise a function of (params, x) under any engine

# optim: gradient transformations and schedules, in the optax style
from .optim.adamw import adamw as adamw  # AdamW with torch's semantics (fused kernel)
from .optim.adamw import decay_mask as decay_mask  # weight decay on matrices, not embeddings
from .optim.base import GradientTransformation as GradientTransformation  # (init, update) pair
from .optim.base import apply_updates as apply_updates  # params + updates
from .optim.base import chain as chain  # transformations one after the other
from .optim.base import update_and_apply as update_and_apply  # step the params (fused where it can)
from .optim.clip import clip_by_global_norm as clip_by_global_norm  # clip_grad_norm_ as a transformation
from .optim.schedules import linear_warmup as linear_warmup  # linear ramp, then constant
from .optim.schedules import warmup_cosine as warmup_cosine  # warmup then cosine (nanoGPT's recipe)
from .optim.sgd import sgd as sgd  # SGD with torch's semantics

# train: the composed step and its transformations
from .train.accumulate import accumulate_gradients as accumulate_gradients  # the fold over micro-batches
from .train.grad import value_and_grad as value_and_grad  # (value, grads); autograd engine by default
from .train.loss_scale import dynamic_loss_scale as dynamic_loss_scale  # GradScaler's rule, as state
from .train.loss_scale import no_op_loss_scale as no_op_loss_scale  # no scaling (bf16, fp32)
from .train.loss_scale import static_loss_scale as static_loss_scale  # a fixed scale
from .train.precision import Policy as Policy  # param, compute and output dtypes
from .train.precision import get_policy as get_policy  # a Policy from "mixed_bf16", ...
from .train.precision import with_policy as with_policy  # a function run at a policy's precision
from .train.guard import NonFiniteUpdateError as NonFiniteUpdateError  # a donated step's update was not finite
from .train.step import TrainState as TrainState  # step, params, optimizer state, loss scale
from .train.step import init_train_state as init_train_state  # a fresh TrainState
from .train.step import make_loss_fn as make_loss_fn  # the model's loss(params, batch)
from .train.step import make_train_step as make_train_step  # step(state, batch) -> (state, metrics)

# io: files written whole or not at all
from .io.checkpoint import load_checkpoint as load_checkpoint  # a TrainState, bit for bit
from .io.checkpoint import save_checkpoint as save_checkpoint  # every tensor of a TrainState, atomically
from .io.gpt2 import load_gpt2 as load_gpt2  # a Hugging Face GPT-2 directory as params
from .io.gpt2 import save_gpt2 as save_gpt2  # params as a Hugging Face GPT-2 directory
from .io.params import load_params as load_params  # params and config from one safetensors file
from .io.params import save_params as save_params  # params in half precision, one safetensors file

# parallel: data parallel and ZeRO on torch.distributed
from .parallel.process_group import init_distributed as init_distributed  # join torchrun's group
from .parallel.process_group import shutdown_distributed as shutdown_distributed  # leave it
from .parallel.replicated import shard_batch as shard_batch  # this rank's rows of a global batch
from .parallel.zero import data_parallel as data_parallel  # parallel= for the step, state, checkpoints

# memory: predicted and measured bytes, and memory hygiene
from .memory.hygiene import with_memory_hygiene as with_memory_hygiene  # gc / cache clearing, measured
from .memory.ledger import MemorySettings as MemorySettings  # the techniques a prediction is for
from .memory.ledger import ablation as ablation  # baseline, each technique alone, all together
from .memory.ledger import predict_memory as predict_memory  # predicted peak bytes, item by item
from .memory.measure import TensorMemoryTracker as TensorMemoryTracker  # peak live tensor bytes
from .memory.measure import measure_memory as measure_memory  # measured peak of real steps
from .memory.rss import reset_rss_peak as reset_rss_peak  # restart the resident high-water mark
from .memory.rss import rss_now as rss_now  # resident bytes of this process now
from .memory.rss import rss_peak as rss_peak  # its resident high-water mark

__all__ = [
    "__version__",
    # data
    "IGNORE_INDEX", "Batch", "pack_documents", "pad_sequences", "sample_batch", "split_microbatches", "load_corpus",
    "train_val_split",
    "decode", "encode",
    # model
    "activate", "attention_kernel", "causal_attention", "PRESETS", "ModelConfig", "get_config", "generate", "apply", "loss_fn",
    "init_params", "param_shapes", "remat",
    # optim
    "adamw", "decay_mask", "GradientTransformation", "apply_updates", "update_and_apply", "chain", "clip_by_global_norm",
    "linear_warmup", "warmup_cosine", "sgd",
    # train
    "accumulate_gradients", "value_and_grad", "dynamic_loss_scale", "no_op_loss_scale", "static_loss_scale",
    "Policy", "get_policy", "with_policy", "NonFiniteUpdateError", "TrainState", "init_train_state", "make_loss_fn",
    "make_train_step",
    # io
    "load_checkpoint", "save_checkpoint", "load_gpt2", "save_gpt2", "load_params", "save_params",
    # parallel
    "init_distributed", "shutdown_distributed", "shard_batch", "data_parallel",
    # memory
    "with_memory_hygiene", "MemorySettings", "ablation", "predict_memory", "TensorMemoryTracker", "measure_memory",
    "reset_rss_peak", "rss_now", "rss_peak",
]
