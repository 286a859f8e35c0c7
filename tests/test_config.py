"""Settings from the environment: a careless value is refused at start, with its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from careflow.config import MAX_INT_SETTING, load_settings
from careflow.errors import ConfigError
from careflow.hub.ingest import Rejected
from careflow.hub.sqlite_store import SqliteStore
from careflow.hub.store import IncomingBatch

_INT_SETTINGS = ("CAREFLOW_MAX_MESSAGE_BYTES", "CAREFLOW_SELF_SILENCE_S",
                 "CAREFLOW_DEADMAN_INTERVAL_S", "CAREFLOW_MAX_DEVICES_PER_GATEWAY",
                 "CAREFLOW_DEAD_LETTER_MAX_ROWS", "CAREFLOW_DEAD_LETTER_MAX_MB")


@pytest.mark.parametrize("name", _INT_SETTINGS)
@pytest.mark.parametrize("text", ["100000000000000000000", str(MAX_INT_SETTING + 1)])
def test_it_refuses_a_number_too_large_to_mean_anything(tmp_path: Path, name: str,
                                                        text: str) -> None:
    """Such a value used to be taken, and then failed where it was used: a dead-letter bound
    beyond SQLite's 64-bit integers failed every commit that dead-lettered anything."""
    with pytest.raises(ConfigError, match=name):
        load_settings({name: text}, data_dir=tmp_path)


def test_the_largest_dead_letter_bounds_allowed_still_work(tmp_path: Path) -> None:
    settings = load_settings({"CAREFLOW_DEAD_LETTER_MAX_ROWS": str(MAX_INT_SETTING),
                              "CAREFLOW_DEAD_LETTER_MAX_MB": str(MAX_INT_SETTING)},
                             data_dir=tmp_path)
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal",
                        dead_letter_max_rows=settings.dead_letter_max_rows,
                        dead_letter_max_bytes=settings.dead_letter_max_bytes)
    try:
        result = store.append(IncomingBatch([], [(Rejected("t", "schema", "why", b"x"), 1)], []))
        assert result.dead_lettered == 1
        assert store.dead_letter_count() == 1
    finally:
        store.close()
