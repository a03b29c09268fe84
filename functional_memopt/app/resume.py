"""What a resume checks and repairs beyond the checkpoint: params.safetensors, and a changed --steps.

``params.safetensors`` is written just after each checkpoint commits, so a crash in between leaves
the previous step's params beside the newest checkpoint; it records the step it holds, and a
resume rewrites it from the checkpoint when it is older, newer, damaged or missing. A resume with
another ``--steps`` stretches (or shrinks) the cosine schedule: that is said, with the learning
rate before and after, and recorded in config.json (``train.steps`` and ``steps_history``) so a
later resume gives the same schedule.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..io.params import params_file_info
from ..io.tensor_files import verify_digest
from ..model.config import ModelConfig
from .run import TrainArgs
from .run_dir import PARAMS_FILE, RunFiles

__all__ = ["repair_params", "steps_change"]


def repair_params(files: RunFiles, state: Any, cfg: ModelConfig, run_dir: str, say: Callable[[str], None]) -> None:
    """Rewrite params.safetensors from the checkpoint's ``state`` when it is missing, damaged or of another step."""
    path = os.path.join(run_dir, PARAMS_FILE)
    step = int(state.step)
    found = None
    if not os.path.isfile(path):
        found = "was missing"
    else:
        try:
            verify_digest(path, caller="train")
            held = params_file_info(path)["step"]
            if held is None:
                found = "did not record its step (an earlier version wrote it)"
            elif held != step:
                found = f"held step {held}, {'older' if held < step else 'newer'} than the checkpoint (step {step})"
        except ValueError as err:
            found = f"was damaged ({str(err).split(': ', 1)[-1][:120]})"
    if found:
        files.save_params(state.params, cfg, step)
        say(f"memopt: {PARAMS_FILE} {found}: rewrote it from the checkpoint.")


def steps_change(config: dict, args: TrainArgs, schedule: Callable, old_schedule: Callable, *, at: int,
                 count: int) -> tuple[str, dict] | None:
    """``(note, new config)`` when ``args.steps`` differs from the run's recorded steps, else None.

    Args:
        config: config.json as read; args: the resumed run's arguments (with the new steps).
        schedule, old_schedule: the learning-rate schedules with the new and the recorded steps.
        at: the batches consumed so far; count: the updates applied (the schedule's position).
    """
    before, after = config["train"]["steps"], args.steps
    if after == before:
        return None
    if args.schedule == "cosine":
        what = (f"the cosine schedule now spans {after} steps instead of {before}: from step {at} on the learning "
                f"rate follows a {after}-step run ({float(old_schedule(count)):.3g} -> {float(schedule(count)):.3g} "
                "now)")
    else:
        what = "the schedule (constant after warmup) is unchanged"
    note = (f"memopt: --steps {after} (was {before}): {what}. config.json records the change, so a later --resume "
            "repeats it.")
    history = list(config.get("steps_history", [])) + [{"at_step": at, "steps_before": before, "steps_after": after}]
    return note, {**config, "train": {**config["train"], "steps": after}, "steps_history": history}
