"""functional_memopt: memory optimisations for training transformer LMs, functional style on torch.func."""

from ._attention import build_attention_mask as build_attention_mask
from ._attention import causal_attention as causal_attention
from ._attention import positions_from_segments as positions_from_segments
from ._config import PRESETS as PRESETS
from ._config import ModelConfig as ModelConfig
from ._config import get_config as get_config
from ._data import Batch as Batch
from ._data import decode as decode
from ._data import encode as encode
from ._data import load_corpus as load_corpus
from ._data import pack_documents as pack_documents
from ._data import pad_sequences as pad_sequences
from ._data import sample_batch as sample_batch
from ._data import split_microbatches as split_microbatches
from ._data import train_val_split as train_val_split
from ._model import IGNORE_INDEX as IGNORE_INDEX
from ._model import apply as apply
from ._model import check_params as check_params
from ._model import init_params as init_params
from ._model import loss_fn as loss_fn
from ._model import param_shapes as param_shapes
from ._remat import checkpoint as checkpoint
from ._remat import remat_layers as remat_layers
from ._tree import tree_add as tree_add
from ._tree import tree_all_finite as tree_all_finite
from ._tree import tree_bytes as tree_bytes
from ._tree import tree_cast as tree_cast
from ._tree import tree_flatten_with_paths as tree_flatten_with_paths
from ._tree import tree_global_norm as tree_global_norm
from ._tree import tree_map as tree_map
from ._tree import tree_scale as tree_scale
from ._tree import tree_select as tree_select
from ._tree import tree_sub as tree_sub
from ._tree import tree_unflatten_from_paths as tree_unflatten_from_paths
from ._tree import tree_zeros_like as tree_zeros_like

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "IGNORE_INDEX",
    "ModelConfig",
    "PRESETS",
    "apply",
    "build_attention_mask",
    "causal_attention",
    "check_params",
    "checkpoint",
    "decode",
    "encode",
    "get_config",
    "init_params",
    "load_corpus",
    "loss_fn",
    "pack_documents",
    "pad_sequences",
    "param_shapes",
    "positions_from_segments",
    "remat_layers",
    "sample_batch",
    "split_microbatches",
    "train_val_split",
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
]
