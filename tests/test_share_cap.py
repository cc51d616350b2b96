"""The enforced GPU share (optimizer/share_cap.py): the cap it computes and the allocator call it makes.
`torch.cuda.set_per_process_memory_fraction` needs a CUDA device, so here a recording object stands
in for `torch.cuda` (only that one setter is called); benchmarks/share_cap.py runs the real one."""
from __future__ import annotations

import pytest

from optimizer.share_cap import allocator_cap_fraction, cap_allocator, share_cap_applies
from serve.app import AppArgs, placement
from serve.replica.settings import memory_fraction_for

GiB = 2**30
H200 = 140 * GiB


class RecordingTorchCuda:
    """Stands in for torch.cuda on a machine without CUDA: records the setter's arguments."""

    def __init__(self):
        self.calls = []

    def set_per_process_memory_fraction(self, fraction, device=None):
        self.calls.append((fraction, device))


def test_the_cap_is_the_shares_budget_less_the_cuda_context():
    share = 0.25
    budget = int(memory_fraction_for("cuda", None, share) * H200)  # 0.9 of a quarter of the card
    fake = RecordingTorchCuda()
    fraction = cap_allocator(fake, 0, budget, outside_allocator_bytes=GiB // 2, total_bytes=H200)
    assert fake.calls == [(fraction, 0)]
    assert fraction == pytest.approx((budget - GiB // 2) / H200)
    assert fraction < share * 0.9  # allocator + context within the budget, the budget within the share


def test_a_budget_smaller_than_the_context_says_what_to_change():
    with pytest.raises(ValueError, match="raise num_gpus or memory_fraction"):
        allocator_cap_fraction(GiB // 4, GiB // 2, H200)


def test_only_a_shared_card_is_capped_and_the_app_can_turn_it_off():
    assert share_cap_applies("serve", "cuda", 0.25) and share_cap_applies("tune", "cuda", 0.5)
    assert not share_cap_applies("serve", "cuda", 1.0)  # alone on its card: no neighbour to guard
    assert not share_cap_applies("serve", "cpu", 0.25)
    assert not share_cap_applies("off", "cuda", 0.25)
    with pytest.raises(ValueError, match="serve, tune, off"):
        share_cap_applies("always", "cuda", 0.25)
    assert AppArgs(model="resnet50").share_cap == "serve"
    assert AppArgs(model="resnet50", share_cap="off").share_cap == "off"


def test_custom_resources_place_replicas_on_a_kind_of_node():
    args = AppArgs(model="resnet50", device="cpu", resources={"gpu_type_a": 0.5})
    assert placement(args).actor_options["resources"] == {"gpu_type_a": 0.5}
    assert "resources" not in placement(AppArgs(model="resnet50", device="cpu")).actor_options
