"""Hugging Face GPT-2 checkpoints: read and write the directory layout transformers uses.

A directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Differences from this library's params, handled here:
keys may carry a ``transformer.`` prefix; old files hold ``attn.bias`` / ``attn.masked_bias``
mask buffers (skipped); Conv1D weights are stored (in, out) where ``F.linear`` wants (out, in);
the output head is tied to ``wte`` so ``lm_head.weight`` is not stored (checked when present).
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch

from .._dtypes import parse_dtype
from .._tree import tree_flatten_with_paths, tree_from_paths
from ..model.config import ModelConfig
from ..model.layout import check_params, check_shapes
from .files import atomic_write, check_finite, check_fits_in_memory
from .tensor_files import atomic_save_safetensors, declared_bytes, open_safetensors, read_header
from .params import STORED_DTYPES, prepare_tensors

__all__ = [
    "load_gpt2",
    "save_gpt2",
    "params_from_gpt2_state_dict",
    "gpt2_state_dict_from_params",
    "config_from_gpt2_config",
    "gpt2_config_from_config",
]

_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))


def _require_bias(cfg: ModelConfig, *, caller: str) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{caller}: cfg must be a ModelConfig, got {type(cfg).__name__}.")
    if not cfg.bias:
        raise ValueError(
            f"{caller}: GPT-2 has biases in every linear and layer-norm layer, but cfg.bias is False; "
            "save this model with save_params instead."
        )


def gpt2_config_from_config(cfg: ModelConfig, *, dtype: torch.dtype | str = torch.float32) -> dict:
    """The ``config.json`` dict of a ``GPT2LMHeadModel`` with the shape of ``cfg``.

    Dropout probabilities are 0 because this model has none; ``n_inner`` is null for the usual
    4x MLP, else ``mlp_ratio * n_embd``.
    """
    _require_bias(cfg, caller="gpt2_config_from_config")
    dtype = parse_dtype(dtype, caller="gpt2_config_from_config", allowed=STORED_DTYPES)
    gpt2_vocab = cfg.vocab_size == 50257  # GPT-2's BPE, whose <|endoftext|> id is 50256
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None if cfg.mlp_ratio == 4 else cfg.mlp_ratio * cfg.n_embd,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": 50256 if gpt2_vocab else None,
        "eos_token_id": 50256 if gpt2_vocab else None,
        "dtype": str(dtype).removeprefix("torch."),
    }


def config_from_gpt2_config(hf: dict, *, caller: str = "config_from_gpt2_config") -> ModelConfig:
    """The ModelConfig of a GPT-2 ``config.json`` dict; ValueError naming any field it cannot represent."""

    def refuse(name, value, why):
        raise ValueError(f"{caller}: config field {name}={value!r} cannot be represented: {why}.")

    # (field, transformers' default, accepted values, why)
    rules = [
        ("model_type", "gpt2", ("gpt2",), "only GPT-2 checkpoints are read"),
        ("activation_function", "gelu_new", _GELU_TANH + ("gelu",), "this model has the tanh GELU (gelu_new) and "
         "the erf GELU (gelu)"),
        ("scale_attn_weights", True, (True,), "attention here is always scaled by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, (False,), "attention here is not scaled by layer index"),
        ("reorder_and_upcast_attn", False, (False,), "set it to false (it only changes the precision of attention)"),
        ("tie_word_embeddings", True, (True,), "this model's output head is the token embedding (wte)"),
        ("add_cross_attention", False, (False,), "this model is decoder-only, with no cross-attention weights"),
    ]
    for name, default, ok, why in rules:
        value = hf.get(name, default)
        if value not in ok:
            refuse(name, value, f"expected one of {list(ok)}; {why}")
    fields = {}
    for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
        value = hf.get(name, hf.get("n_ctx") if name == "n_positions" else None)
        if value is None:
            raise ValueError(f"{caller}: config field {name!r} is missing; a GPT-2 config.json must give it.")
        fields[name] = value
    n_inner = hf.get("n_inner")
    mlp_ratio = 4
    if n_inner is not None:
        if not isinstance(n_inner, int) or n_inner <= 0 or n_inner % fields["n_embd"]:
            refuse("n_inner", n_inner, f"the MLP width must be a whole multiple of n_embd ({fields['n_embd']})")
        mlp_ratio = n_inner // fields["n_embd"]
    try:
        return ModelConfig(
            vocab_size=fields["vocab_size"], block_size=fields["n_positions"], n_layer=fields["n_layer"],
            n_head=fields["n_head"], n_embd=fields["n_embd"], bias=True,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02),
            mlp_ratio=mlp_ratio,
            activation="gelu" if hf.get("activation_function", "gelu_new") == "gelu" else "gelu_tanh",
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{caller}: the GPT-2 config gives an invalid model shape ({err}).") from None


def _our_key(hf_key: str) -> str | None:
    """This library's path for a GPT-2 key, or None for buffers and the tied head."""
    k = hf_key.removeprefix("transformer.")
    if _BUFFER.match(k) or k == "lm_head.weight":
        return None
    return {"wte.weight": "wte", "wpe.weight": "wpe"}.get(k, k)


def _plan(shapes: dict[str, tuple], cfg: ModelConfig, *, caller: str, source: str) -> tuple[dict, str | None]:
    """``{our key: hf key}`` checked against ``cfg``, and the lm_head key if there is one."""
    mapping, ours = {}, {}
    for hf_key, shape in shapes.items():
        k = _our_key(hf_key)
        if k is None:
            continue
        if k in mapping:
            raise ValueError(f"{caller}: {source} holds both {mapping[k]!r} and {hf_key!r}; keep one of them.")
        mapping[k] = hf_key
        ours[k] = tuple(reversed(shape)) if _CONV1D.match(k) else tuple(shape)
    check_shapes(ours, cfg, caller=caller, source=source)
    head = [k for k in shapes if k.removeprefix("transformer.") == "lm_head.weight"]
    return mapping, (head[0] if head else None)


def _convert(key: str, t: torch.Tensor, dtype, device, *, copy: bool) -> torch.Tensor:
    if _CONV1D.match(key):  # Conv1D stores (in, out); transpose and lay out in one copy
        return t.t().to(device=device, dtype=dtype, memory_format=torch.contiguous_format).contiguous()
    return t.to(device=device, dtype=dtype, copy=copy)


def _check_head(head: torch.Tensor, wte: torch.Tensor, *, caller: str) -> None:
    head = head.to(device=wte.device, dtype=wte.dtype)
    if head.shape != wte.shape or not torch.equal(head, wte):
        diff = (head.float() - wte.float()).abs().max().item() if head.shape == wte.shape else "shape"
        warnings.warn(
            f"{caller}: lm_head.weight differs from the token embedding wte (max abs difference {diff}); "
            "this model ties them, so wte serves as the output head and lm_head.weight is ignored.",
            stacklevel=3,
        )


def params_from_gpt2_state_dict(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, *, dtype: torch.dtype | None = None, device=None
) -> dict:
    """This library's params tree from a GPT-2 state dict (``GPT2LMHeadModel.state_dict()``).

    Args:
        sd: keys with or without the ``transformer.`` prefix; mask buffers are skipped and
            ``lm_head.weight``, if present, is checked against ``wte`` (a warning if it differs).
        cfg: the shape, e.g. from :func:`config_from_gpt2_config`.
        dtype, device: of the returned leaves (default: as in ``sd``).

    Returns:
        The params tree, every leaf a new contiguous tensor.

    Example:
        >>> params = params_from_gpt2_state_dict(hf_model.state_dict(), cfg)  # doctest: +SKIP
    """
    caller = "params_from_gpt2_state_dict"
    mapping, head = _plan({k: tuple(v.shape) for k, v in sd.items()}, cfg, caller=caller, source="the state dict")
    flat = {k: _convert(k, sd[h].detach(), dtype, device, copy=True) for k, h in mapping.items()}
    if head is not None:
        _check_head(sd[head].detach(), flat["wte"], caller=caller)
    return tree_from_paths(flat)


def gpt2_state_dict_from_params(params: dict, cfg: ModelConfig, *, prefix: str = "transformer.") -> dict:
    """A GPT-2 state dict (Conv1D layout, ``prefix`` on every key, no ``lm_head.weight``) of ``params``.

    Conv1D weights are transposed views of the params, not copies.

    Example:
        >>> hf_model.load_state_dict(gpt2_state_dict_from_params(params, cfg), strict=False)  # doctest: +SKIP
    """
    _require_bias(cfg, caller="gpt2_state_dict_from_params")
    check_params(params, cfg)
    names = {"wte": "wte.weight", "wpe": "wpe.weight"}
    return {
        prefix + names.get(k, k): (v.t() if _CONV1D.match(k) else v)
        for k, v in tree_flatten_with_paths(params).items()
    }


def _shards(directory: str, index: str) -> list[str]:
    """The shard files an index names, each checked to be a file name inside ``directory``."""
    name = os.path.basename(index)
    try:
        with open(index, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_gpt2: {index!r} is not valid JSON ({err}).") from None
    weight_map = record.get("weight_map") if isinstance(record, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"load_gpt2: {name} in {directory!r} has no weight_map (a JSON object from tensor names to shard "
            "files); the index is damaged. Restore it, or save the model again with save_pretrained."
        )
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"load_gpt2: {name} in {directory!r} maps a tensor to {bad[0]!r}, not a shard file name; "
                         "the index is damaged.")
    root = os.path.realpath(directory)
    shards = []
    for shard in sorted(set(weight_map.values())):
        target = os.path.realpath(os.path.join(root, shard))  # symbolic links resolved too
        if os.path.isabs(shard) or os.path.dirname(target) != root or not shard.endswith(".safetensors"):
            raise ValueError(
                f"load_gpt2: {name} in {directory!r} names the shard {shard!r}, which is not a .safetensors file "
                "inside that directory; shard paths must be plain file names there (nothing was read)."
            )
        shards.append(target)
    return shards


def _weight_files(directory: str) -> list[str]:
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        return _shards(directory, index)
    names = sorted(os.listdir(directory))
    if any(n.endswith(".bin") for n in names):
        raise ValueError(
            f"load_gpt2: {directory!r} holds PyTorch pickle weights (.bin) only; convert them to "
            "safetensors first, e.g. GPT2LMHeadModel.from_pretrained(directory).save_pretrained(directory)."
        )
    raise ValueError(f"load_gpt2: no model.safetensors in {directory!r} (found {names}).")


def load_gpt2(
    directory: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device=None
) -> tuple[dict, ModelConfig]:
    """Read a Hugging Face GPT-2 directory (config.json + model.safetensors) as (params, cfg).

    Args:
        directory: as written by ``GPT2LMHeadModel.save_pretrained`` or :func:`save_gpt2`.
        dtype: dtype of the returned leaves (float32 by default, whatever was stored).
        device: where the leaves go (default CPU).

    Returns:
        (params, cfg).

    Example:
        >>> params, cfg = load_gpt2("gpt2-checkpoint")  # doctest: +SKIP
    """
    dtype = parse_dtype(dtype, caller="load_gpt2", allowed=STORED_DTYPES)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_gpt2: no directory at {directory!r}; check the path.")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"load_gpt2: {directory!r} has no config.json; it is not a Hugging Face model directory.")
    try:
        with open(config_path) as f:
            cfg = config_from_gpt2_config(json.load(f), caller="load_gpt2")
    except json.JSONDecodeError as err:
        raise ValueError(f"load_gpt2: {config_path!r} is not valid JSON ({err}).") from None
    flat, head, source = {}, None, repr(directory)
    files = _weight_files(directory)
    declared = 0
    for path in files:  # the bound on all shards together, before any tensor is read
        try:
            declared += declared_bytes(read_header(path)[1], itemsize=dtype.itemsize)
        except (OSError, ValueError):
            pass  # open_safetensors below reports the unreadable file by name
    check_fits_in_memory(declared, caller="load_gpt2", source=repr(directory))
    shapes, where = {}, {}
    for path in files:
        with open_safetensors(path, caller="load_gpt2", itemsize=dtype.itemsize) as f:
            for k in f.keys():
                shapes[k], where[k] = tuple(f.get_slice(k).get_shape()), path
    mapping, head_key = _plan(shapes, cfg, caller="load_gpt2", source=source)
    wanted = {h: k for k, h in mapping.items()}
    for path in files:  # one memory-mapped tensor at a time
        with open_safetensors(path, caller="load_gpt2") as f:
            for h in f.keys():
                if h in wanted:
                    flat[wanted[h]] = _convert(wanted[h], f.get_tensor(h), dtype, device, copy=False)
                elif h == head_key:
                    head = f.get_tensor(h)
    if head is not None:
        _check_head(head, flat["wte"], caller="load_gpt2")
    check_finite(flat, caller="load_gpt2", source=source)
    params = tree_from_paths(flat)
    check_params(params, cfg)
    return params, cfg


def save_gpt2(
    directory: str | os.PathLike,
    params: dict,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
) -> None:
    """Write ``params`` as a Hugging Face GPT-2 directory that ``GPT2LMHeadModel.from_pretrained`` loads.

    ``model.safetensors`` (keys ``transformer.*``, Conv1D layout, head tied to ``wte``) then
    ``config.json``, each written atomically. The directory is created if needed.

    Args:
        directory: output directory; one that is not empty is refused unless ``overwrite``.
        params, cfg: the model (cfg.bias must be True, as in GPT-2).
        dtype: stored dtype (float32 by default; fp16 needs |values| <= 65504).
        overwrite: replace model.safetensors and config.json in a non-empty directory.

    Example:
        >>> save_gpt2("out", params, cfg)  # doctest: +SKIP
        >>> transformers.GPT2LMHeadModel.from_pretrained("out")  # doctest: +SKIP
    """
    dtype = parse_dtype(dtype, caller="save_gpt2", allowed=STORED_DTYPES)
    directory = os.fspath(directory)
    _require_bias(cfg, caller="save_gpt2")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_gpt2: {directory!r} is a file; pass a directory path.")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise ValueError(
            f"save_gpt2: {directory!r} is not empty ({sorted(os.listdir(directory))[:5]}); pass "
            "overwrite=True to replace its model files, or choose an empty directory."
        )
    config = gpt2_config_from_config(cfg, dtype=dtype)
    try:
        check_params(params, cfg)
    except ValueError as err:
        raise ValueError(f"save_gpt2: {err}") from None
    # Everything is validated and cast before the first byte is written.
    tensors = prepare_tensors(gpt2_state_dict_from_params(params, cfg), dtype, caller="save_gpt2")
    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"}, caller="save_gpt2")
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(directory, "config.json"), lambda tmp: _write_text(tmp, text), caller="save_gpt2")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
