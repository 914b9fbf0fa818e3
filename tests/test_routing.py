"""Route key -> pipe: FNV-1a 64-bit, upper 32 bits, modulo the pipe count, and its cache."""

from __future__ import annotations

import functools
import itertools
import shutil
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer.routing import PipeMap, fnv1a64, pipe_for

SYMBOLS = ["AAPL", "MSFT", "TSLA", "SPY", "BRK.A", "F", "GOOGL", "X:BTCUSD", "O:SPY251219C00650000"]


def reference_fnv1a64(data: bytes) -> int:
    """FNV-1a 64 straight from its definition: xor each byte in, multiply, keep 64 bits."""
    basis, prime = 14695981039346656037, 1099511628211
    return functools.reduce(lambda digest, byte: ((digest ^ byte) * prime) % 2**64, data, basis)


def reference_pipe(symbol: str, pipes: int) -> int:
    """The C original's pipe choice, upper half of the 64-bit hash modulo the pipe count."""
    return (reference_fnv1a64(symbol.encode()) // 2**32) % pipes


@pytest.mark.parametrize(
    ("data", "digest"),
    [
        # Published FNV-1a 64-bit test vectors (Fowler/Noll/Vo test suite).
        (b"", 0xCBF29CE484222325),
        (b"a", 0xAF63DC4C8601EC8C),
        (b"foobar", 0x85944171F73967E8),
    ],
)
def test_fnv1a64_published_vectors(data: bytes, digest: int) -> None:
    """fnv1a64 gives the published FNV-1a 64-bit digests."""
    assert fnv1a64(data) == digest


@given(st.binary(max_size=64))
def test_fnv1a64_matches_definition(data: bytes) -> None:
    """fnv1a64 equals a fold of xor-then-multiply modulo 2**64 over any bytes."""
    assert fnv1a64(data) == reference_fnv1a64(data)


@pytest.mark.parametrize("pipes", [4, 16])
@pytest.mark.parametrize("symbol", SYMBOLS)
def test_pipe_for_symbols(symbol: str, pipes: int) -> None:
    """pipe_for maps a symbol to the upper 32 hash bits modulo the pipe count."""
    assert pipe_for(symbol.encode(), pipes) == reference_pipe(symbol, pipes)


@given(st.binary(max_size=32), st.integers(min_value=1, max_value=4096))
def test_pipe_for_is_in_range(key: bytes, pipes: int) -> None:
    """pipe_for always returns a pipe index from 0 to pipes - 1."""
    assert 0 <= pipe_for(key, pipes) < pipes


def test_pipe_for_agrees_with_c(tmp_path: Path) -> None:
    """pipe_for agrees with the same formula compiled as C with 64-bit unsigned arithmetic."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    source = tmp_path / "lb_hash.c"
    source.write_text(
        "#include <stdint.h>\n#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
        "static uint64_t fnv1a64(const unsigned char *p, size_t n) {\n"
        "    uint64_t h = 0xcbf29ce484222325ULL;\n"
        "    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }\n"
        "    return h;\n}\n"
        "int main(int argc, char **argv) {\n"
        "    uint32_t pipes = (uint32_t)strtoul(argv[1], NULL, 10);\n"
        "    for (int i = 2; i < argc; i++) {\n"
        "        uint32_t high = (uint32_t)(fnv1a64((const unsigned char *)argv[i],"
        " strlen(argv[i])) >> 32);\n"
        '        printf("%u\\n", high % pipes);\n    }\n    return 0;\n}\n'
    )
    binary = tmp_path / "lb_hash"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    for pipes in (3, 4, 16, 1000):
        result = subprocess.run(
            [str(binary), str(pipes), *SYMBOLS], check=True, capture_output=True, text=True
        )
        expected = [pipe_for(symbol.encode(), pipes) for symbol in SYMBOLS]
        assert [int(line) for line in result.stdout.split()] == expected


def tickers(length: int) -> list[bytes]:
    """Every ticker of ``length`` capital letters."""
    combinations = itertools.product(string.ascii_uppercase, repeat=length)
    return ["".join(letters).encode() for letters in combinations]


@pytest.mark.parametrize("pipes", [7, 15])
def test_pipe_for_spreads_tickers_over_odd_pipe_counts(pipes: int) -> None:
    """Over an odd pipe count the 18,278 tickers of one to three letters spread as by chance."""
    counts = [0] * pipes
    for key in tickers(1) + tickers(2) + tickers(3):
        counts[pipe_for(key, pipes)] += 1
    expected = sum(counts) / pipes
    chi_square = sum((count - expected) ** 2 / expected for count in counts)
    assert chi_square < 3 * pipes  # well under the 0.1% critical value (37.7 for 15 pipes)
    assert min(counts) > 0.9 * expected
    assert max(counts) < 1.1 * expected


def test_pipe_for_clusters_short_tickers_over_power_of_two_pipes() -> None:
    """As in the C original, 16 pipes put all one- and two-letter tickers on two pipes."""
    # Modulo 2**k only bits 32..32+k-1 of the hash count, and below bit 40 the FNV prime acts
    # as a multiplication by 0x1b3, which moves a byte's influence up ~9 bits per byte.
    pipes = {pipe_for(key, 16) for key in tickers(1) + tickers(2)}
    assert len(pipes) <= 2


def test_pipe_map_matches_pipe_for() -> None:
    """PipeMap.pipe returns pipe_for's answer, first computed, then cached."""
    pipe_map = PipeMap(16)
    for symbol in SYMBOLS * 2:
        assert pipe_map.pipe(symbol.encode()) == pipe_for(symbol.encode(), 16)
    assert len(pipe_map) == len(SYMBOLS)


def test_pipe_map_cache_is_bounded() -> None:
    """PipeMap never holds more keys than its limit and keeps answering correctly."""
    pipe_map = PipeMap(4, limit=10)
    for number in range(100):
        key = b"SYM%d" % number
        assert pipe_map.pipe(key) == pipe_for(key, 4)
        assert len(pipe_map) <= 10


@pytest.mark.parametrize(("pipes", "limit"), [(0, 10), (-1, 10), (4, 0)])
def test_pipe_map_rejects_bad_arguments(pipes: int, limit: int) -> None:
    """PipeMap refuses a pipe count or cache limit below one."""
    with pytest.raises(ValueError, match="at least 1"):
        PipeMap(pipes, limit)


def test_power_of_two_pipe_counts_get_a_warning_and_odd_ones_do_not() -> None:
    """A power-of-two pipe count is warned about, with odd neighbours suggested."""
    from tradebalancer.routing import balance_warning

    warning = balance_warning(16, 4096)
    assert warning is not None and "15" in warning and "17" in warning
    assert [n for n in range(1, 70) if balance_warning(n, 4096)] == [2, 4, 8, 16, 32, 64]


def test_the_warning_at_the_largest_count_suggests_only_a_smaller_one() -> None:
    """At the maximum (4096) it suggested 4097, which the configuration refuses."""
    from tradebalancer.routing import balance_warning

    warning = balance_warning(4096, 4096)
    assert warning is not None and "4095" in warning and "4097" not in warning
