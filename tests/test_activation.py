"""The MLP's activation is a config field: GPT-2's tanh GELU or the exact (erf) GELU, honoured everywhere."""

import json

import pytest
import torch
import torch.nn.functional as F

import functional_memopt as fm
from functional_memopt.model.gpt import activate
from functional_memopt.testing.reference import ReferenceGPT

from _hf_reference import hf_from_params, hf_logits

CFG = dict(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_the_model_matches_hugging_face_and_the_reference_for_each_activation(activation):
    cfg = fm.ModelConfig(**CFG, activation=activation)
    params = fm.init_params(cfg, seed=3)
    # Pre-activations of order 1, where the two GELUs differ, and an MLP output that carries it.
    params = {**params, "h": [{**b, "mlp": {"c_fc": {**b["mlp"]["c_fc"], "weight": b["mlp"]["c_fc"]["weight"] * 40},
                                            "c_proj": {**b["mlp"]["c_proj"], "weight": b["mlp"]["c_proj"]["weight"] * 40}}}
                              for b in params["h"]]}
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = fm.apply(params, tokens, cfg)
    # fp32, within 1e-5 as the other Hugging Face parity tests: the two GELUs differ by up to 5e-4
    # at pre-activations of order 1, so a model that ignored the field would fail by far more.
    torch.testing.assert_close(ours, hf_logits(hf_from_params(params, cfg), tokens), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours, ReferenceGPT.from_params(params, cfg)(tokens), rtol=1e-5, atol=1e-5)
    other = fm.ModelConfig(**CFG, activation="gelu" if activation == "gelu_tanh" else "gelu_tanh")
    # The other activation moves the logits by more than twice the parity tolerance: the field reaches the math.
    assert (fm.apply(params, tokens, other) - ours).abs().max() > 2e-5


def test_gpt2_directories_keep_the_activation_and_refuse_one_the_model_cannot_honour(tmp_path):
    cfg = fm.ModelConfig(**CFG, activation="gelu")
    fm.save_gpt2(tmp_path / "m", fm.init_params(cfg), cfg)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["activation_function"] == "gelu"
    assert fm.load_gpt2(tmp_path / "m")[1].activation == "gelu"
    fm.save_params(tmp_path / "p.safetensors", fm.init_params(cfg), cfg)
    assert fm.load_params(tmp_path / "p.safetensors")[1].activation == "gelu"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu' cannot be represented"):
        fm.load_gpt2(tmp_path / "m")


def test_an_unknown_activation_is_refused_with_the_accepted_names():
    with pytest.raises(ValueError, match="activation must be one of"):
        fm.ModelConfig(activation="swish")


def _compiled_ops(fn, x) -> set:
    """The torch functions dynamo records when it traces ``fn(x)``."""
    ops: set = set()

    def capture(gm, example_inputs):
        ops.update(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(x)
    return ops


def test_compiled_for_the_cpu_gpt2s_gelu_is_traced_as_x_times_sigmoid_and_eager_it_is_torchs():
    x = torch.linspace(-8, 8, 101)
    ops = _compiled_ops(lambda t: activate(t, "gelu_tanh"), x)
    assert torch.sigmoid in ops and F.gelu not in ops, ops
    # Elsewhere (here the meta device stands for CUDA, which it has not been measured on) and for
    # the erf GELU, torch's own GELU is traced; eager, it runs, bit for bit.
    assert F.gelu in _compiled_ops(lambda t: activate(t, "gelu_tanh"), x.to("meta"))
    assert F.gelu in _compiled_ops(lambda t: activate(t, "gelu"), x)
    assert torch.equal(activate(x, "gelu_tanh"), F.gelu(x, approximate="tanh"))
    assert torch.equal(activate(x, "gelu"), F.gelu(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_sigmoid_form_is_gpt2s_gelu_within_rounding_value_and_gradient(dtype):
    # x * sigmoid(2u) is 0.5 x (1 + tanh(u)) exactly; what differs is rounding. The forward has 8
    # rounded operations and its backward about 12 more, each within eps of a term no larger than
    # max(1, |value|) for |x| <= 8 (the derivative's two terms stay below 1.2 there): 16 eps.
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    g = torch.cos(x * 7)

    def value_and_grad(fn, x):
        x = x.detach().requires_grad_()
        y = fn(x)
        return y.detach(), torch.autograd.grad(y, x, g.to(x.dtype))[0]

    torch._dynamo.reset()
    got = value_and_grad(torch.compile(lambda t: activate(t, "gelu_tanh")), x.to(dtype))
    want = value_and_grad(lambda t: F.gelu(t, approximate="tanh"), x)
    eps = torch.finfo(dtype).eps
    for a, b in zip(got, want):
        err = (a.double() - b).abs() / b.abs().clamp(min=1.0)
        assert float(err.max()) <= 16 * eps, float(err.max()) / eps
