"""careflow.core.text: the one rule by which the CLI and the web show hostile text."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from careflow.cli.common import literal as cli_literal
from careflow.core.text import format_age, literal
from careflow.hub.web.views import visible as web_visible

_ACTS = {"\t", "\n"}  # kept: they lay text out and reorder nothing


@given(st.text())
def test_it_leaves_no_control_or_bidirectional_character_acting(text: str) -> None:
    shown = literal(text)
    assert not any((unicodedata.category(c) == "Cc" and c not in _ACTS)
                   or unicodedata.bidirectional(c) in ("LRE", "RLE", "LRO", "RLO", "PDF",
                                                        "LRI", "RLI", "FSI", "PDI")
                   or c in "\u200e\u200f" for c in shown)
    assert cli_literal(text) == web_visible(text) == shown


def test_it_says_an_age_in_its_largest_unit() -> None:
    assert [format_age(ms, now_ms=100_000_000) for ms in
            (None, 100_000_000, 99_996_000, 99_820_000, 92_800_000, 100_000_000 - 86_400_000,
             200_000_000)] == ["-", "0s", "4s", "3m", "2h", "1d", "0s"]
