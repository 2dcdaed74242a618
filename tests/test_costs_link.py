"""The link model: an offload's cost from its real bytes, RTT and the time of one device layer."""

import argparse
import dataclasses
import doctest

import numpy as np
import pytest

from stream import costs
from stream.costs import LINKS, LinkedCostModel, Trace, link_overrides, preset
from stream.errors import ConfigError

from policies.base import Feedback
from policies.engine import feedback_event
from policies.splitee import SplitEE


def test_offload_cost_by_hand():
    # 4g: 20 ms RTT, 5.85 Mbit/s; 50,000 bytes = 400,000 bits = 68.376 ms; one device layer 4 ms (λ = 1)
    cost = preset("splitee", num_layers=6, **link_overrides("4g", layer_ms=4.0))
    trace = Trace(device_layers=2, device_exits=1, tier="cloud", cloud_layers=4, offload_bytes=50_000)
    assert cost.breakdown(trace).offload == pytest.approx((20.0 + 400_000 / 5_850) / 4.0)
    assert cost.breakdown(trace).offload == pytest.approx(22.094017, abs=1e-6)
    # DIMEE's device layer costs 1.5λ: one device layer's time is 1.5λ there
    dimee = preset("dimee", num_layers=6, **link_overrides("5g", layer_ms=2.0))
    edge = Trace(device_layers=2, tier="edge", edge_layers=1, offload_bytes=10_000)
    assert dimee.breakdown(edge).offload == pytest.approx(1.5 * (8.0 + 80_000 / 50_000) / 2.0)


def test_presets_and_their_units():
    assert {n: (link.rtt_ms, link.mbps) for n, link in LINKS.items()} == {
        "3g": (100.0, 1.1), "4g": (20.0, 5.85), "5g": (8.0, 50.0), "wifi": (5.0, 18.88)}
    assert LINKS["wifi"].ms(18_880_000 / 8) == pytest.approx(5.0 + 1000.0)   # one second of wifi uplink


def test_without_a_link_the_bytes_change_nothing():
    cost = preset("splitee", num_layers=6)
    small, large = (Trace(2, 1, tier="cloud", cloud_layers=4, offload_bytes=b) for b in (1_000, 100_000))
    assert cost.breakdown(small) == cost.breakdown(large)
    assert cost.breakdown(small).offload == 2.5
    assert "link_mbps" not in dataclasses.asdict(cost)   # namespaces of link-free policies are unchanged


def test_unknown_bytes_cost_the_reference_payload_or_the_constant():
    plain = preset("splitee", num_layers=6, **link_overrides("wifi", layer_ms=3.4))
    assert plain.offload_cloud == 2.5                         # no reference: the constant stays
    assert plain.breakdown(Trace(2, 1, tier="cloud")).offload == 2.5
    ref = preset("splitee", num_layers=6, **link_overrides("wifi", layer_ms=3.4, ref_bytes=49_664))
    expected = (5.0 + 49_664 * 8 / 18_880) / 3.4
    assert ref.offload_cloud == pytest.approx(expected) and ref.offload_edge == pytest.approx(expected)
    assert ref.breakdown(Trace(2, 1, tier="cloud")).offload == pytest.approx(expected)
    assert ref.breakdown(Trace(2, 1, tier="device")).offload == 0.0
    assert "link RTT 5 ms, 18.88 Mbit/s" in ref.describe(6)


def test_bad_links_are_refused():
    with pytest.raises(ConfigError, match="unknown link '6g'"):
        link_overrides("6g")
    with pytest.raises(ConfigError, match="a link needs link_mbps > 0 and layer_ms > 0"):
        preset("splitee", num_layers=6, link_rtt_ms=10.0)
    with pytest.raises(ConfigError, match="layer_ms=0.0"):
        preset("splitee", num_layers=6, link_mbps=10.0, layer_ms=0.0)
    with pytest.raises(ConfigError, match="unknown cost parameter"):
        preset("splitee", num_layers=6, link_kbps=10.0)


def test_a_linked_model_keeps_its_link_through_overrides():
    cost = preset("splitee", num_layers=6, **link_overrides("3g", layer_ms=3.0))
    again = cost.with_overrides(mu=0.2)
    assert isinstance(again, LinkedCostModel) and again.link_mbps == 1.1 and again.mu == 0.2


def _feedback_reward(cost, nbytes):
    """SplitEE's reward of an offload at arm 2, learned from its feedback (C_L = 0.9)."""
    policy = SplitEE(cost=cost, num_layers=6, alpha=0.8)
    trace = Trace(device_layers=2, device_exits=1, tier="cloud", cloud_layers=4, offload_bytes=nbytes)
    event = feedback_event("imdb-1", {"arm": 2, "ns": policy.namespace()}, trace,
                           Feedback(6, np.array([0.1, 0.9], dtype=np.float32)))
    return policy.learn(event, None)["s2"]


def test_an_offload_reward_follows_its_bytes_only_with_a_link():
    plain = preset("splitee", num_layers=6)
    assert _feedback_reward(plain, 10_000) == _feedback_reward(plain, 100_000)
    assert _feedback_reward(plain, 10_000) == pytest.approx(0.9 - 0.1 * (6 / 7 * 2 + 1 / 7 + 2.5))
    linked = preset("splitee", num_layers=6, **link_overrides("4g", layer_ms=4.0))
    small, large = _feedback_reward(linked, 10_000), _feedback_reward(linked, 100_000)
    assert small > large
    assert small - large == pytest.approx(0.1 * 90_000 * 8 / 5_850 / 4.0)


def test_the_feedback_trace_carries_the_bytes_back_to_the_device():
    # what the remote stage writes in feedback, read back as the device stage does
    sent = {"device_layers": 2, "device_exits": 1, "tier": "cloud", "edge_layers": 0, "cloud_layers": 4,
            "offload_bytes": 48_614}
    trace = Trace(**{k: sent[k] for k in Trace.__dataclass_fields__ if k in sent})
    assert trace.offload_bytes == 48_614
    with pytest.raises(ConfigError, match="offload_bytes must be >= 0"):
        Trace(offload_bytes=-1)


def test_the_worker_option_puts_the_link_in_the_policy_spec():
    from consumers.cli import add_policy_args, policy_spec
    parser = argparse.ArgumentParser()
    add_policy_args(parser)
    parser.add_argument("--max-len", type=int, default=128)
    args = parser.parse_args(["--policy", "splitee", "--link", "wifi", "--layer-ms", "3.4", "--hidden-encoding", "i8"])
    spec = policy_spec(args, hidden_size=384)
    cost = spec.cost_model(6)
    assert isinstance(cost, LinkedCostModel) and cost.link_ref_bytes == 128 * 388
    assert cost.offload_cloud == pytest.approx((5.0 + 128 * 388 * 8 / 18_880) / 3.4)
    plain = policy_spec(parser.parse_args(["--policy", "splitee"]))
    assert plain.cost_overrides == {}


def test_costs_docstring_examples():
    assert doctest.testmod(costs).failed == 0
