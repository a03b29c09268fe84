"""``memopt sample`` and ``memopt convert``: models read from a run directory, a params file or a GPT-2 directory."""

from __future__ import annotations

import argparse
import os
import sys

from ..data.tokens import BYTE_VOCAB, decode, encode
from ..io.checkpoint import checkpoint_info, has_checkpoint, load_checkpoint_params
from ..io.gpt2 import load_gpt2, save_gpt2
from ..io.params import load_params, save_params
from ..model.generate import generate
from .format import format_bytes
from .run import resolve_device

__all__ = ["sample_command", "convert_command"]


def _load_model(source: str, device, *, caller: str):
    """(params, cfg, paths read) from a run directory, a params file or a GPT-2 directory."""

    if os.path.isdir(source):
        params_file = os.path.join(source, "params.safetensors")
        if os.path.isfile(params_file):
            return (*load_params(params_file, device=device), [params_file])
        if has_checkpoint(source):
            tensors = os.path.join(source, checkpoint_info(source)["tensors"])
            return (*load_checkpoint_params(source, device=device), [tensors])
        if os.path.isfile(os.path.join(source, "config.json")):
            params, cfg = load_gpt2(source, device=device)
            paths = [os.path.join(source, f) for f in os.listdir(source) if f.endswith((".safetensors", ".json"))]
            return params, cfg, paths
        raise ValueError(
            f"{caller}: {source!r} holds no params.safetensors, checkpoint or Hugging Face GPT-2 model "
            "(config.json + model.safetensors)."
        )
    if os.path.isfile(source):
        return (*load_params(source, device=device), [source])
    raise FileNotFoundError(f"{caller}: no file or directory at {source!r}; check the path.")


def _size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def sample_command(ns: argparse.Namespace) -> int:

    device = resolve_device(ns.device)
    params, cfg, _ = _load_model(ns.source, device, caller="sample")
    if ns.prompt is not None and ns.prompt_ids is not None:
        raise ValueError("sample: give --prompt or --prompt-ids, not both.")
    if ns.prompt_ids is not None:
        try:
            ids = [int(x) for x in ns.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ValueError(f"sample: --prompt-ids must be comma-separated integers, got {ns.prompt_ids!r}.") from None
    elif cfg.vocab_size != BYTE_VOCAB:
        raise ValueError(
            f"sample: this model's vocabulary has {cfg.vocab_size} tokens, not bytes, so text cannot be encoded "
            "here; give the prompt as token ids with --prompt-ids 464,3290 (ids are printed back)."
        )
    else:
        ids = encode(ns.prompt if ns.prompt is not None else "\n").tolist()
    out = generate(params, cfg, ids, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                   top_k=ns.top_k, seed=ns.seed)
    if cfg.vocab_size == BYTE_VOCAB:
        sys.stdout.write(decode(out) + "\n")
    else:
        print(",".join(str(i) for i in out.tolist()))
    return 0


def convert_command(ns: argparse.Namespace) -> int:

    if os.path.exists(ns.output) and not ns.force:
        raise ValueError(
            f"convert: {ns.output!r} already exists; pass --force to replace it, or choose another output."
        )
    if os.path.abspath(ns.input) == os.path.abspath(ns.output):
        raise ValueError("convert: the output must differ from the input.")
    params, cfg, read = _load_model(ns.input, "cpu", caller="convert")
    if ns.to == "gpt2":
        save_gpt2(ns.output, params, cfg, dtype=ns.dtype, overwrite=ns.force)
        written = [os.path.join(ns.output, f) for f in ("model.safetensors", "config.json")]
    else:
        save_params(ns.output, params, cfg, dtype=ns.dtype)
        written = [ns.output]
    print(f"memopt: converted {ns.input} ({format_bytes(_size(read))}) -> {ns.output} ({format_bytes(_size(written))}, {ns.dtype})")
    return 0
