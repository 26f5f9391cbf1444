"""A restarted consumer gets its partitions back quickly on the embedded Tansu broker when it is a
static member (METAVOICE_KAFKA_GROUP_INSTANCE_ID): measured on the real broker, as benchmark.rejoin
does (Tansu makes a plain member's restart wait almost twice the session timeout)."""

from __future__ import annotations

import pytest

from benchmark.rejoin import arm
from broker.clients import make_consumer
from pipeline.config import Settings

SESSION_MS = 6000


async def test_the_instance_id_setting_makes_a_static_member():
    static, plain = make_consumer(Settings(group="g", kafka_group_instance_id="pod-0")), make_consumer(Settings(group="g"))
    try:
        assert static._group_instance_id == "pod-0" and plain._group_instance_id is None
    finally:
        await static.stop()
        await plain.stop()


@pytest.mark.integration
@pytest.mark.slow
async def test_a_restarted_static_member_is_assigned_within_the_session_timeout(services):
    """Measured on Tansu: a plain member's restart waits ~1.85x the session timeout (11 s at 6 s),
    a static member's ~1x (6 s); the bound sits between them, well above the static figure."""
    first, rejoin = await arm(services.kafka_bootstrap, partitions=2, session_ms=SESSION_MS, static=True)
    assert rejoin < 1.5 * SESSION_MS / 1000, (first, rejoin)
