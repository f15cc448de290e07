# ruff: noqa: F811  (test arguments named like the fixtures imported below)
"""The monitor benchmark runs on both stores and reports every figure the budget needs."""

from __future__ import annotations

from detectors.monitor_bench import BUDGET_BYTES, abenchmark_monitors, format_table
from tests.detectors.monitor_fixtures import monitor_world
from tests.redis_fixtures import redis_server, redis_url  # noqa: F401  (fixtures)


async def test_the_benchmark_measures_cost_and_state_on_memory_and_redis(redis_url):
    world = monitor_world()
    x = world.mnist.x_test[:200]
    report = await abenchmark_monitors(
        world.suite,
        x,
        world.predicted(x),
        queries=30,
        warmup=70,
        clients=50,
        redis_url=redis_url,
        index_queries=20,
    )
    monitors = set(world.suite.monitors)
    assert set(report["backends"]) == {"memory", "redis"}
    for backend in ("memory", "redis"):
        assert set(report["backends"][backend]) == monitors | {"risk"}
        for timing in report["backends"][backend].values():
            assert 0 < timing["median_us"] <= timing["p99_us"]
    for name in monitors:
        state = report["state_bytes"][name]
        assert 0 < state["encoded"] <= state["max_state_bytes"]
    # The risk record counts with the monitor risks kept beside it (GetClient's breakdown).
    assert report["state_bytes"]["risk"]["encoded"] > 16 + 16
    budget = report["budget"]
    assert budget["budget_bytes"] == BUDGET_BYTES
    assert budget["memory_bytes_per_client"] > budget["encoded_bytes_per_client"]
    assert budget["memory_fits"] and budget["redis_fits"]
    assert report["blacklight_index"]["keys_per_query"] == world.suite.monitors["blacklight"].top_s + 1
    assert report["blacklight_index"]["redis_bytes_per_query"] > 0
    table = format_table(report)
    assert "blacklight" in table and "100,000 clients" in table and "fits" in table
