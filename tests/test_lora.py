"""``erasure.lora``: adapters as forward hooks start at the unadapted model, act as ``W + B A``, and leave no trace."""

import pytest
import torch

from erasure.lora import lora_deltas, lora_hooks


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))


def test_the_adapter_starts_at_the_model_and_acts_as_w_plus_b_a():
    net, x = model(), torch.randn(3, 6)
    parameters = {f"net.{name}": p for name, p in net.named_parameters() if p.ndim == 2}
    before = net(x)
    weights = {key: p.detach().clone() for key, p in parameters.items()}
    with lora_hooks(net, parameters, rank=2, generator=torch.Generator().manual_seed(1)) as factors:
        assert torch.equal(net(x), before)  # B = 0
        assert {key: (a.shape, b.shape) for key, (a, b) in factors.items()} == {
            "net.0.weight": ((2, 6), (5, 2)), "net.2.weight": ((2, 5), (4, 2))
        }  # fmt: skip
        with torch.no_grad():
            for _, b in factors.values():
                b.normal_()
        adapted = net(x)
        deltas = lora_deltas(factors)
    for key, p in parameters.items():
        assert torch.equal(p, weights[key])  # the weights never moved
    assert torch.equal(net(x), before)  # the hooks are gone
    with torch.no_grad():
        for key, p in parameters.items():
            p += deltas[key]
        torch.testing.assert_close(net(x), adapted)  # W x + B (A x) == (W + B A) x


def test_a_weight_that_is_not_two_dimensional_is_refused_and_no_hook_stays():
    net, x = model(), torch.randn(2, 6)
    before = net(x)
    parameters = {"net.0.weight": net[0].weight, "net.0.bias": net[0].bias}
    with pytest.raises(ValueError, match=r"net\.0\.bias has 1 dimensions"):
        with lora_hooks(net, parameters, rank=1, generator=torch.Generator()):
            pass
    assert torch.equal(net(x), before) and not net[0]._forward_hooks
