"""``memopt sample`` and ``memopt convert``: models read from a run directory, a params file or a GPT-2 directory."""

from __future__ import annotations

import argparse
import os
import sys

from ..data.tokens import BYTE_VOCAB, decode, encode
from ..io.checkpoint import checkpoint_info, has_checkpoint, load_checkpoint_params
from ..io.gpt2 import load_gpt2, save_gpt2
from ..io.params import load_params, params_file_info, save_params
from ..model.generate import check_sampling, generate
from .format import format_bytes
from .run import resolve_device
from .run_dir import PARAMS_FILE

__all__ = ["sample_command", "convert_command"]


def _note(text: str) -> None:
    print(f"memopt: note: {text}", file=sys.stderr)


def _staleness(params_file: str, run_dir: str) -> str | None:
    """Why ``params_file`` is not the newest checkpoint's params (None when it is, or there is no checkpoint)."""
    if not has_checkpoint(run_dir):
        return None
    try:
        newest = checkpoint_info(run_dir)["step"]
        held = params_file_info(params_file)["step"]
    except (OSError, ValueError, KeyError):
        return None  # reported by whichever file is then read
    if held is None:
        return f"{params_file} does not record its step (an earlier version wrote it); the newest checkpoint is step {newest}"
    if held < newest:
        return f"{params_file} holds step {held}, older than the newest checkpoint (step {newest})"
    return None


def _load_model(source: str, device, *, caller: str):
    """(params, cfg, paths read) from a run directory, a params file or a GPT-2 directory.

    A run directory's params.safetensors is read when it holds the newest checkpoint's step; when it
    is older (a crash while it was being written) or damaged, the checkpoint is read instead, and
    a note says so. A params file named directly is read as asked, with the same note.
    """

    if os.path.isdir(source):
        params_file = os.path.join(source, PARAMS_FILE)
        if os.path.isfile(params_file):
            stale = _staleness(params_file, source)
            if stale is None:
                try:
                    return (*load_params(params_file, device=device), [params_file])
                except ValueError as err:
                    if not has_checkpoint(source):
                        raise
                    stale = str(err)
            _note(f"{stale}; reading the checkpoint instead (`memopt train --resume {source}` rewrites "
                  f"{PARAMS_FILE}).")
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
        stale = _staleness(source, os.path.dirname(os.path.abspath(source)))
        if stale is not None and os.path.basename(source) == PARAMS_FILE:
            _note(f"{stale}; reading it as asked (pass the run directory to read the newest checkpoint).")
        return (*load_params(source, device=device), [source])
    raise FileNotFoundError(f"{caller}: no file or directory at {source!r}; check the path.")


def _size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def sample_command(ns: argparse.Namespace) -> int:

    device = resolve_device(ns.device)
    check_sampling(ns.temperature, ns.top_k, caller="sample", names=("--temperature", "--top-k"))
    if ns.max_new_tokens < 0:
        raise ValueError(f"sample: --max-new-tokens must be >= 0, got {ns.max_new_tokens}.")
    params, cfg, _ = _load_model(ns.source, device, caller="sample")
    check_sampling(ns.temperature, ns.top_k, cfg.vocab_size, caller="sample", names=("--temperature", "--top-k"))
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
