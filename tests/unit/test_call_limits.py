"""CallLimits and the stream slots of api/limits.py, without a server."""

from __future__ import annotations

import pytest

from shardwright.api.limits import FLAGS, CallLimits, StreamSlots, peer_ip


def test_limits_refuse_nonsense_with_the_flag_named():
    with pytest.raises(ValueError, match="--max-streams-per-peer must be positive"):
        CallLimits(max_streams_per_peer=0)
    with pytest.raises(ValueError, match="--generate-default-deadline-s .* above --generate-max-deadline-s"):
        CallLimits(generate_default_deadline_s=10, generate_max_deadline_s=5)
    with pytest.raises(ValueError, match="--max-concurrent-rpcs"):
        CallLimits(max_streams=100, max_concurrent_rpcs=100)
    assert CallLimits(max_workers=4, max_streams=8).threads == 12
    assert set(FLAGS) == {f for f in CallLimits.__dataclass_fields__}


def test_slots_count_per_key_and_in_total_and_name_the_full_limit():
    slots = StreamSlots(CallLimits(max_streams=3))
    assert slots.acquire("tenant a", 2, "max_streams_per_tenant") is None
    assert slots.acquire("tenant a", 2, "max_streams_per_tenant") is None
    refusal = slots.acquire("tenant a", 2, "max_streams_per_tenant")
    assert "tenant a" in refusal and "--max-streams-per-tenant" in refusal and "per tenant" in refusal
    assert slots.acquire("peer 1.2.3.4", 2, "max_streams_per_peer") is None
    assert "--max-streams`" in slots.acquire("peer 5.6.7.8", 2, "max_streams_per_peer")
    for key in ("tenant a", "tenant a", "peer 1.2.3.4"):
        slots.release(key)
    assert slots.total == 0 and slots.by_key == {}


def test_peer_ip():
    assert peer_ip("ipv4:127.0.0.1:5678") == "127.0.0.1"
    assert peer_ip("ipv6:[::1]:5678") == "::1"
    assert peer_ip("unix:/tmp/s") == "unix:/tmp/s"
