"""megatron-core's torch Adam fallback switched to torch's fused kernel: same update, one pass."""

from types import SimpleNamespace

import torch

from megatron_patch.training.setup import use_fused_adam


def adam_steps(fused: bool, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    inner = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    wrapper = SimpleNamespace(optimizer=inner)  # what megatron-core's mixed-precision optimizers hold
    if fused:
        use_fused_adam(SimpleNamespace(chained_optimizers=[wrapper]))
        assert all(group["fused"] and not group["foreach"] for group in inner.param_groups)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        inner.step()
    return [p.detach().clone() for p in params]


def test_fused_update_equals_the_default_implementation():
    for fused, default in zip(adam_steps(fused=True), adam_steps(fused=False)):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-6)


def test_left_alone_where_torch_has_no_fused_kernel():
    inner = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    use_fused_adam(SimpleNamespace(optimizer=inner))
    assert "fused" not in inner.param_groups[0] or not inner.param_groups[0]["fused"]
