"""Model configuration: a frozen, validated dataclass and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ModelConfig", "PRESETS", "get_config", "ACTIVATIONS", "ATTENTION_KERNELS"]

ACTIVATIONS = ("gelu_tanh", "gelu")  # the tanh-approximated GELU (GPT-2's) and the exact, erf GELU
ATTENTION_KERNELS = ("auto", "sdpa", "math")  # how attention is computed (model/attention.py); same math


@dataclass(frozen=True)
class ModelConfig:
    """Shape and initialisation of a GPT-2 style decoder-only transformer.

    Change a field with ``dataclasses.replace(cfg, n_layer=2)``; the copy is validated again.

    Example:
        >>> cfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)
        >>> cfg.head_dim
        16
    """

    vocab_size: int = 256  # tokens in the vocabulary (256 for the byte tokenizer)
    block_size: int = 128  # longest sequence the position table covers
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual width; must be divisible by n_head
    bias: bool = True  # biases in linear and layer-norm layers (GPT-2 has them)
    layer_norm_eps: float = 1e-5  # GPT-2's epsilon
    init_std: float = 0.02  # N(0, init_std) for weights; residual projections get /sqrt(2 n_layer)
    mlp_ratio: int = 4  # hidden width of the MLP is mlp_ratio * n_embd
    activation: str = "gelu_tanh"  # the MLP's GELU: "gelu_tanh" (GPT-2's) or "gelu" (erf; about half the CPU time)
    attention: str = "auto"  # the attention kernel: "sdpa", "math", or "auto" (by device, dtype, T)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"ModelConfig: {name} must be a positive integer, got {value!r}; "
                    f"pass e.g. {name}=4."
                )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"ModelConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"choose n_embd as a multiple of n_head, e.g. n_embd={self.n_head * max(1, self.n_embd // self.n_head)}."
            )
        if not (self.layer_norm_eps > 0):
            raise ValueError(f"ModelConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}; "
                             "pass activation='gelu_tanh' (GPT-2's) or 'gelu'.")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"ModelConfig: attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}; "
                             "pass attention='auto' (the faster kernel for the device and shape), 'sdpa' or 'math'.")
        if not (self.init_std > 0):
            raise ValueError(f"ModelConfig: init_std must be > 0, got {self.init_std!r}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, n_embd // n_head."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"ModelConfig.from_dict: unknown keys {unknown}; expected a subset of {sorted(names)}."
            )
        return cls(**data)


# Shapes of the GPT-2 family (vocab 50257, context 1024) and a CPU-sized byte-level model.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    "small": ModelConfig(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2": ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """Return the preset called ``name``, with optional field overrides.

    Example:
        >>> get_config("tiny", n_layer=2).n_layer
        2
    """
    if name not in PRESETS:
        raise ValueError(f"get_config: unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
