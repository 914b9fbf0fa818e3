"""Synthetic trades, the recording file format, and splitting a frame into its events."""

from __future__ import annotations

import collections
import gzip
import json
import re
import statistics
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer.errors import ConfigError
from tradebalancer.replay import synth

TRADE_KEYS = ["ev", "sym", "i", "x", "p", "s", "c", "t", "q", "z"]
SYMBOL = re.compile(r"[A-Z]{1,5}(\.[A-Z])?")


def events_of(frames: list[bytes]) -> list[dict[str, object]]:
    return [event for frame in frames for event in orjson.loads(frame)]


def test_same_seed_same_bytes() -> None:
    """The generator is deterministic: the same arguments give the same frames."""
    first = list(synth.generate_frames(7, 500, 5000))
    assert first == list(synth.generate_frames(7, 500, 5000))
    assert first != list(synth.generate_frames(8, 500, 5000))


def test_exact_count_and_batch_sizes() -> None:
    """Frames hold min_batch to max_batch trades, the last one fewer so the total is exact."""
    frames = list(synth.generate_frames(3, 300, 10_001, min_batch=50, max_batch=500))
    sizes = [len(orjson.loads(frame)) for frame in frames]
    assert sum(sizes) == 10_001
    assert all(50 <= size <= 500 for size in sizes[:-1])
    assert 1 <= sizes[-1] <= 500


def test_trade_fields_in_polygon_order() -> None:
    """Every trade has Polygon's fields in order, c sometimes absent, trfi/trft after z."""
    events = events_of(list(synth.generate_frames(1, 1000, 20_000)))
    with_conditions = with_trf = 0
    for event in events:
        keys = list(event)
        if "trfi" in event:
            with_trf += 1
            assert keys[-2:] == ["trfi", "trft"]
            assert event["x"] == 4
            keys = keys[:-2]
        if "c" in event:
            with_conditions += 1
        assert keys == [k for k in TRADE_KEYS if k in event]
        assert event["ev"] == "T"
        assert isinstance(event["i"], str) and event["i"].isdigit()
        assert isinstance(event["p"], float) and event["p"] > 0
        assert isinstance(event["s"], int) and event["s"] > 0
        assert event["z"] in (1, 2, 3)
    assert 0.2 * len(events) < with_conditions < 0.9 * len(events)
    assert 0.05 * len(events) < with_trf < 0.5 * len(events)


def test_sequence_and_time_increase() -> None:
    """Sequence numbers count up by one and timestamps never go back."""
    events = events_of(list(synth.generate_frames(2, 100, 3000)))
    assert [e["q"] for e in events] == list(range(1, 3001))
    stamps = [e["t"] for e in events]
    assert stamps == sorted(stamps)


def test_compact_and_about_110_bytes_per_trade() -> None:
    """Frames are compact JSON (no spaces) with trades of about 110 bytes on average."""
    frames = list(synth.generate_frames(1, 4000, 50_000))
    assert not any(b" " in frame for frame in frames)
    average = sum(map(len, frames)) / 50_000
    assert 90 < average < 130


def test_symbols_unique_and_realistic() -> None:
    """Symbol names are unique, 1-5 capital letters, a few with a share class like BRK.B."""
    names = synth.make_symbols(4000, seed=5)
    assert len(names) == len(set(names)) == 4000
    assert all(SYMBOL.fullmatch(name) for name in names)
    assert sum("." in name for name in names) >= 20
    assert synth.make_symbols(4000, seed=5) == names


def test_zipf_popularity() -> None:
    """The most traded symbol is far more traded than the median one."""
    counts = collections.Counter(
        event["sym"] for event in events_of(list(synth.generate_frames(4, 4000, 100_000)))
    )
    top = counts.most_common(1)[0][1]
    median = statistics.median(counts.values())
    assert top > 50 * median
    assert len(counts) > 3000  # the tail is traded too


@pytest.mark.parametrize(("name", "compressed"), [("rec.jsonl", False), ("rec.jsonl.gz", True)])
def test_recording_round_trip(tmp_path: Path, name: str, compressed: bool) -> None:
    """write_recording then read_recording gives the same frames, gzip or not."""
    frames = list(synth.generate_frames(9, 200, 4000))
    path = tmp_path / name
    assert synth.write_recording(path, frames, comment="made by a test\nsecond line") == len(frames)
    assert path.read_bytes().startswith(b"\x1f\x8b") is compressed
    assert list(synth.read_recording(path)) == frames
    counts = [count for _, count in synth.read_recording_events(path)]
    assert counts == [len(orjson.loads(frame)) for frame in frames]


def test_gzip_recognised_by_magic_bytes(tmp_path: Path) -> None:
    """A gzip recording is read whatever its name."""
    path = tmp_path / "recording.txt"
    path.write_bytes(gzip.compress(b'[{"ev":"T","sym":"A"}]\n'))
    assert list(synth.read_recording(path)) == [b'[{"ev":"T","sym":"A"}]']


def test_comments_blank_lines_and_spacing(tmp_path: Path) -> None:
    """Comments and blank lines are skipped; a line's own bytes are kept, spaces around dropped."""
    path = tmp_path / "rec"
    path.write_bytes(b'# a comment\n\n  [{"ev": "T", "sym": "A"}]  \r\n\t\n[]\n[{"ev":"Q"}]')
    assert list(synth.read_recording_events(path)) == [
        (b'[{"ev": "T", "sym": "A"}]', 1),
        (b"[]", 0),
        (b'[{"ev":"Q"}]', 1),
    ]


@pytest.mark.parametrize(
    ("line", "detail"),
    [(b'[{"ev":"T"', "not valid JSON"), (b'{"ev":"T"}', "a JSON dict, not an array")],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: bytes, detail: str) -> None:
    """A line that is not a JSON array raises ConfigError with the file and line number."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'# header\n[{"ev":"T"}]\n' + line + b"\n[]\n")
    with pytest.raises(ConfigError) as caught:
        list(synth.read_recording(path))
    message = str(caught.value)
    assert f"{path}, line 3" in message
    assert detail in message
    assert "each line must be one JSON array" in message


def test_missing_or_corrupt_file(tmp_path: Path) -> None:
    """A missing file and a broken gzip stream raise ConfigError naming the file."""
    with pytest.raises(ConfigError, match="missing"):
        list(synth.read_recording(tmp_path / "missing"))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(b"[]\n" * 100)[:-6])  # no trailer
    with pytest.raises(ConfigError, match=r"broken\.gz"):
        list(synth.read_recording(broken))


def test_invalid_generator_arguments() -> None:
    """Impossible batch sizes or symbol counts raise ConfigError."""
    with pytest.raises(ConfigError, match="min_batch"):
        list(synth.generate_frames(1, 10, 100, min_batch=10, max_batch=5))
    with pytest.raises(ConfigError, match="symbols"):
        list(synth.generate_frames(1, 0, 100))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.lists(json_values, max_size=8))
def test_split_events_gives_each_element(elements: list[object]) -> None:
    """split_events returns each top-level element's exact bytes, compact or spaced."""
    compact = json.dumps(elements, separators=(",", ":"), ensure_ascii=False).encode()
    expected = [json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() for e in elements]
    assert synth.split_events(compact) == expected
    spaced = b" " + json.dumps(elements).encode().replace(b"[", b"[ \n", 1) + b" "
    assert synth.split_events(spaced) == [json.dumps(e).encode() for e in elements]
