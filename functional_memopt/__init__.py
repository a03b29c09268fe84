"""functional_memopt: memory optimisations for training transformer LMs, in a functional style on torch.func.

The public surface is exactly what this module re-exports; everything else is private.
"""

from ._version import __version__ as __version__
from ._config import ModelConfig as ModelConfig
from ._config import PRESETS as PRESETS
from ._config import get_config as get_config
from ._tree import tree_map as tree_map
from ._tree import tree_add as tree_add
from ._tree import tree_sub as tree_sub
from ._tree import tree_scale as tree_scale
from ._tree import tree_cast as tree_cast
from ._tree import tree_zeros_like as tree_zeros_like
from ._tree import tree_global_norm as tree_global_norm
from ._tree import tree_all_finite as tree_all_finite
from ._tree import tree_select as tree_select
from ._tree import tree_bytes as tree_bytes
from ._tree import tree_flatten_with_paths as tree_flatten_with_paths
from ._tree import tree_unflatten_from_paths as tree_unflatten_from_paths
from ._attention import causal_attention as causal_attention
from ._attention import build_attention_mask as build_attention_mask
from ._attention import positions_from_segments as positions_from_segments
from ._model import IGNORE_INDEX as IGNORE_INDEX
from ._model import init_params as init_params
from ._model import apply as apply
from ._model import loss_fn as loss_fn
from ._model import param_shapes as param_shapes
from ._model import check_params as check_params
from ._remat import checkpoint as checkpoint
from ._remat import remat_layers as remat_layers
from ._data import Batch as Batch
from ._data import encode as encode
from ._data import decode as decode
from ._data import load_corpus as load_corpus
from ._data import train_val_split as train_val_split
from ._data import sample_batch as sample_batch
from ._data import split_microbatches as split_microbatches
from ._data import pad_sequences as pad_sequences
from ._data import pack_documents as pack_documents
from ._grad import value_and_grad as value_and_grad
from ._precision import Policy as Policy
from ._precision import get_policy as get_policy
from ._precision import with_policy as with_policy
from ._precision import tolerance as tolerance
from ._precision import relative_error as relative_error
from ._precision import LOSS_TOLERANCE_FACTOR as LOSS_TOLERANCE_FACTOR
from ._precision import GRAD_TOLERANCE_FACTOR as GRAD_TOLERANCE_FACTOR
from ._loss_scale import LossScale as LossScale
from ._loss_scale import NoOpLossScale as NoOpLossScale
from ._loss_scale import StaticLossScale as StaticLossScale
from ._loss_scale import DynamicLossScale as DynamicLossScale
from ._loss_scale import no_op_loss_scale as no_op_loss_scale
from ._loss_scale import static_loss_scale as static_loss_scale
from ._loss_scale import dynamic_loss_scale as dynamic_loss_scale
from ._loss_scale import all_finite as all_finite
from ._accumulate import accumulate_gradients as accumulate_gradients
from ._optim import GradientTransformation as GradientTransformation
from ._optim import ScaleByAdamState as ScaleByAdamState
from ._optim import SgdState as SgdState
from ._optim import EmptyState as EmptyState
from ._optim import chain as chain
from ._optim import sgd as sgd
from ._optim import adamw as adamw
from ._optim import clip_by_global_norm as clip_by_global_norm
from ._optim import apply_updates as apply_updates
from ._optim import decay_mask as decay_mask
from ._schedules import constant_schedule as constant_schedule
from ._schedules import linear_warmup as linear_warmup
from ._schedules import cosine_decay as cosine_decay
from ._schedules import warmup_cosine as warmup_cosine
from ._train import TrainState as TrainState
from ._train import init_train_state as init_train_state
from ._train import make_train_step as make_train_step
from ._train import make_loss_fn as make_loss_fn
from ._train import batch_token_count as batch_token_count
from ._train import summarize_gradients as summarize_gradients
from ._train import update_params as update_params
from ._storage import save_params as save_params
from ._storage import load_params as load_params
from ._gpt2 import load_gpt2 as load_gpt2
from ._gpt2 import save_gpt2 as save_gpt2
from ._gpt2 import config_from_gpt2_config as config_from_gpt2_config
from ._gpt2 import gpt2_config_from_config as gpt2_config_from_config
from ._gpt2 import gpt2_state_dict_from_params as gpt2_state_dict_from_params
from ._gpt2 import params_from_gpt2_state_dict as params_from_gpt2_state_dict
from ._checkpoint import save_checkpoint as save_checkpoint
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import checkpoint_info as checkpoint_info
from ._sample import generate as generate
from ._process_group import DistInfo as DistInfo
from ._process_group import init_distributed as init_distributed
from ._process_group import shutdown_distributed as shutdown_distributed
from ._process_group import broadcast_tree as broadcast_tree
from ._process_group import replica_checksum as replica_checksum
from ._process_group import assert_replicas_equal as assert_replicas_equal
from ._process_group import on_rank_0 as on_rank_0
from ._process_group import RankFailed as RankFailed
from ._distributed import shard_batch as shard_batch
from ._distributed import Parallelism as Parallelism
from ._distributed import replicated as replicated
from ._distributed import all_reduce_accumulated as all_reduce_accumulated
from ._distributed import init_data_parallel_state as init_data_parallel_state
from ._distributed import make_data_parallel_step as make_data_parallel_step
from ._distributed import save_distributed_checkpoint as save_distributed_checkpoint
from ._distributed import load_distributed_checkpoint as load_distributed_checkpoint
from ._zero import data_parallel as data_parallel
from ._zero import FlatLayout as FlatLayout
from ._zero import flat_layout as flat_layout
from ._ledger import MemoryPrediction as MemoryPrediction
from ._ledger import MemorySettings as MemorySettings
from ._ledger import ablation as ablation
from ._ledger import predict_memory as predict_memory
from ._ledger import saved_activation_bytes as saved_activation_bytes
from ._memory import MemoryMeasurement as MemoryMeasurement
from ._memory import TensorMemoryTracker as TensorMemoryTracker
from ._memory import measure_memory as measure_memory
from ._memory import untied_loss_fn as untied_loss_fn
from ._memory import untied_params as untied_params
from ._memory import with_memory_hygiene as with_memory_hygiene
from ._memory_cli import ablation_report as ablation_report
from ._memory_cli import format_table as format_table
from ._memory_cli import plot_ablation as plot_ablation

__all__ = [
    "__version__",
    "ablation",
    "ablation_report",
    "accumulate_gradients",
    "adamw",
    "all_finite",
    "all_reduce_accumulated",
    "apply",
    "apply_updates",
    "assert_replicas_equal",
    "Batch",
    "batch_token_count",
    "broadcast_tree",
    "build_attention_mask",
    "causal_attention",
    "chain",
    "check_params",
    "checkpoint",
    "checkpoint_info",
    "clip_by_global_norm",
    "config_from_gpt2_config",
    "constant_schedule",
    "cosine_decay",
    "data_parallel",
    "decay_mask",
    "decode",
    "DistInfo",
    "dynamic_loss_scale",
    "DynamicLossScale",
    "EmptyState",
    "encode",
    "flat_layout",
    "FlatLayout",
    "format_table",
    "generate",
    "get_config",
    "get_policy",
    "gpt2_config_from_config",
    "gpt2_state_dict_from_params",
    "GRAD_TOLERANCE_FACTOR",
    "GradientTransformation",
    "IGNORE_INDEX",
    "init_data_parallel_state",
    "init_distributed",
    "init_params",
    "init_train_state",
    "linear_warmup",
    "load_checkpoint",
    "load_corpus",
    "load_distributed_checkpoint",
    "load_gpt2",
    "load_params",
    "loss_fn",
    "LOSS_TOLERANCE_FACTOR",
    "LossScale",
    "make_data_parallel_step",
    "make_loss_fn",
    "make_train_step",
    "measure_memory",
    "MemoryMeasurement",
    "MemoryPrediction",
    "MemorySettings",
    "ModelConfig",
    "no_op_loss_scale",
    "NoOpLossScale",
    "on_rank_0",
    "pack_documents",
    "pad_sequences",
    "Parallelism",
    "param_shapes",
    "params_from_gpt2_state_dict",
    "plot_ablation",
    "Policy",
    "positions_from_segments",
    "predict_memory",
    "PRESETS",
    "RankFailed",
    "relative_error",
    "remat_layers",
    "replica_checksum",
    "replicated",
    "sample_batch",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "save_gpt2",
    "save_params",
    "saved_activation_bytes",
    "ScaleByAdamState",
    "sgd",
    "SgdState",
    "shard_batch",
    "shutdown_distributed",
    "split_microbatches",
    "static_loss_scale",
    "StaticLossScale",
    "summarize_gradients",
    "TensorMemoryTracker",
    "tolerance",
    "train_val_split",
    "TrainState",
    "tree_add",
    "tree_all_finite",
    "tree_bytes",
    "tree_cast",
    "tree_flatten_with_paths",
    "tree_global_norm",
    "tree_map",
    "tree_scale",
    "tree_select",
    "tree_sub",
    "tree_unflatten_from_paths",
    "tree_zeros_like",
    "untied_loss_fn",
    "untied_params",
    "update_params",
    "value_and_grad",
    "warmup_cosine",
    "with_memory_hygiene",
    "with_policy",
]
