"""Sizes the pool can never hold and multiattach: the driver (loaded the way cinder-volume loads
it, against a live daemon) refuses them with the exception Cinder expects and leaves nothing
behind, and its stats make Cinder's own scheduler filters (``CapacityFilter``,
``CapabilitiesFilter``) say the same before the driver is asked.

The pool ``p`` holds 4 GiB; with Cinder's default ``max_over_subscription_ratio`` of 20 a
volume can be up to 80 GiB (thin), and at most 1 EiB whatever the ratio (storvisor's limit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder_kit import load_driver, new_snapshot, new_volume  # noqa: E402  # registers objects

# isort: split
from cinder import exception  # noqa: E402
from cinder.scheduler import host_manager  # noqa: E402
from cinder.scheduler.filters.capabilities_filter import CapabilitiesFilter  # noqa: E402
from cinder.scheduler.filters.capacity_filter import CapacityFilter  # noqa: E402
from oslo_utils import timeutils  # noqa: E402

from storvisor.api.client import Client  # noqa: E402

GIB = 1 << 30
EIB_IN_GIB = 1 << 30
CONNECTOR = {"host": "compute-1"}


def names(sv: Client) -> set[str]:
    return {v.name for v in sv.volumes("p")}


def exports(sv: Client, volume: Any) -> list[str]:
    return [e.spec.name for e in sv.exports() if e.spec.volume == volume.name]


def pool_state(driver: Any) -> Any:
    """The scheduler's view of the driver's pool, from its stats as cinder-volume reports
    them."""
    stats = driver.get_volume_stats(refresh=True)
    (pool,) = stats["pools"]
    state = host_manager.PoolState("testhost@storvisor-1", None, None, pool["pool_name"])
    state.update_from_volume_capability({**pool, "timestamp": timeutils.utcnow()})
    return state


# -- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [81, 1000, EIB_IN_GIB + 1])
def test_a_volume_the_pool_can_never_hold_is_refused(
    driver: Any, ctx: Any, sv: Client, size: int
) -> None:
    before = names(sv)
    volume = new_volume(ctx, size=size)
    with pytest.raises(exception.VolumeBackendAPIException, match="can never fit storvisor pool p"):
        driver.create_volume(volume)
    assert names(sv) == before
    assert not CapacityFilter().backend_passes(pool_state(driver), {"size": size})


def test_thin_volumes_larger_than_the_pool_within_the_ratio(
    driver: Any, ctx: Any, sv: Client
) -> None:
    assert CapacityFilter().backend_passes(pool_state(driver), {"size": 10})
    volume = new_volume(ctx, size=10)
    driver.create_volume(volume)
    try:
        assert sv.volume_info("p", volume.name).size == 10 * GIB  # 2.5 times the pool
    finally:
        driver.delete_volume(volume)


def test_beyond_one_exbibyte_with_an_automatic_ratio(
    storvisor_home: Path, tmp_path: Path, ctx: Any, sv: Client
) -> None:
    """With ``max_over_subscription_ratio = auto`` the driver has no ratio of its own: the
    daemon's 1 EiB limit refuses the volume."""
    drv = load_driver(
        tmp_path,
        {
            "storvisor_api_url": f"unix://{storvisor_home}/api.sock",
            "storvisor_pool": "p",
            "max_over_subscription_ratio": "auto",
        },
    )
    before = names(sv)
    with pytest.raises(exception.VolumeBackendAPIException, match="at most 1 EiB"):
        drv.create_volume(new_volume(ctx, size=EIB_IN_GIB + 1))
    assert names(sv) == before


def test_extend_beyond_the_pool_is_refused_and_the_size_kept(
    driver: Any, ctx: Any, sv: Client
) -> None:
    volume = new_volume(ctx, size=1)
    driver.create_volume(volume)
    try:
        with pytest.raises(exception.VolumeBackendAPIException, match="can never fit"):
            driver.extend_volume(volume, 81)
        assert sv.volume_info("p", volume.name).size == GIB
        filter_properties = {"size": 1, "new_size": 81}
        assert not CapacityFilter().backend_passes(pool_state(driver), filter_properties)
    finally:
        driver.delete_volume(volume)


def test_oversized_copies_leave_no_clone_and_no_temporary_snapshot(
    driver: Any, ctx: Any, sv: Client
) -> None:
    source = new_volume(ctx)
    driver.create_volume(source)
    snapshot = new_snapshot(ctx, source)
    driver.create_snapshot(snapshot)
    try:
        before = names(sv)
        with pytest.raises(exception.VolumeBackendAPIException, match="can never fit"):
            driver.create_volume_from_snapshot(new_volume(ctx, size=81), snapshot)
        with pytest.raises(exception.VolumeBackendAPIException, match="can never fit"):
            driver.create_cloned_volume(new_volume(ctx, size=81), source)
        assert names(sv) == before
        assert [s.name for s in sv.snapshots("p", source.name)] == [snapshot.name]
    finally:
        driver.delete_snapshot(snapshot)
        driver.delete_volume(source)


# -- multiattach --------------------------------------------------------------------------------


def test_stats_say_no_multiattach_and_the_scheduler_keeps_such_volumes_away(
    driver: Any,
) -> None:
    state = pool_state(driver)
    assert driver.get_volume_stats()["pools"][0]["multiattach"] is False
    multiattach = {"resource_type": {"extra_specs": {"multiattach": "<is> True"}}}
    assert not CapabilitiesFilter().backend_passes(state, multiattach)
    plain = {"resource_type": {"extra_specs": {}}}
    assert CapabilitiesFilter().backend_passes(state, plain)


def test_a_multiattach_volume_is_refused_and_nothing_is_made(
    driver: Any, ctx: Any, sv: Client
) -> None:
    before = names(sv)
    with pytest.raises(exception.VolumeBackendAPIException, match="multiattach"):
        driver.create_volume(new_volume(ctx, multiattach=True))
    assert names(sv) == before


def test_attaching_a_volume_made_multiattach_is_refused_and_nothing_is_exported(
    driver: Any, ctx: Any, sv: Client
) -> None:
    """A volume retyped to a multiattach type after it was made here."""
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        volume.multiattach = True
        with pytest.raises(exception.VolumeBackendAPIException, match="multiattach"):
            driver.initialize_connection(volume, CONNECTOR)
        assert exports(sv, volume) == []
    finally:
        driver.delete_volume(volume)
