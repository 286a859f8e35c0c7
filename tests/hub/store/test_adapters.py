"""open_store: the one place that picks an adapter opens the store the settings describe."""

from __future__ import annotations

from pathlib import Path

from careflow.hub.store.adapters import open_store
from careflow.hub.store.records import EventFilter
from tests.conftest import heartbeat, make_settings
from tests.hub.conftest import batch_of
from tests.hub.store.conftest import refused, source


def test_it_opens_the_store_in_the_data_directory_with_its_bounds(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", None, CAREFLOW_MAX_DEVICES_PER_GATEWAY="1",
                             CAREFLOW_DEAD_LETTER_MAX_ROWS="2")
    store = open_store(settings)
    try:
        result = store.append(batch_of([heartbeat(source("gw", "s1")),
                                        heartbeat(source("gw", "s2"))]))
        store.append(refused(5))
        assert [o.device for o in result.over_bound] == ["s2"]  # the device bound
        assert store.dead_letter_count() == 2  # the dead-letter bound
    finally:
        store.close()
    again = open_store(settings)  # another connection to the same store
    try:
        assert again.count(EventFilter(device="s1")) == 1
    finally:
        again.close()
    assert settings.db_path.exists()
