"""A feed's workers planned: argv rendered, pipes divided, directory and environment."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer import config
from tradebalancer.command import KNOWN_VARIABLES
from tradebalancer.config import FeedConfig
from tradebalancer.errors import ConfigError
from tradebalancer.plan import (
    argv_for,
    clean_environment,
    pipe_block,
    pipes_for_worker,
    plan_workers,
    worker_variables,
    working_directory,
)


def make_feed(command: str = '["worker"]', **keys: object) -> FeedConfig:
    """Load a one-feed configuration with ``command`` and the TOML values of ``keys``."""
    lines = [f"{key} = {value}" for key, value in keys.items()]
    return config.loads("\n".join(["[feeds.feed]", f"command = {command}", *lines])).feed("feed")


@pytest.mark.parametrize(
    ("command", "index", "message"),
    [
        ('["w", "x", "{{ fd }}"]', 2, "unknown variable 'fd' in template '{{ fd }}'; known: feed"),
        ('["w", "{% for %}"]', 1, "syntax error in template '{% for %}' at line 1"),
        ('[""]', 0, 'must be a non-empty string, got ""'),
        ('["{{ feed[9:] }}"]', 0, "'{{ feed[9:] }}' renders to an empty string (worker 0)"),
        ('["w", "{% if worker %}x{% endif %}"]', 1, "renders to an empty string (worker 0)"),
        ('["w", "{{ pipes[1] }}"]', 1, "list object has no element 1 in template"),
        ('["w", "{{ feed.nope }}"]', 1, "has no attribute 'nope'"),
        ('["w", "{{ 1 // (worker - 1) }}"]', 1, "failed (worker 1): ZeroDivisionError"),
        ('["w", "a{{ \'\\u0000\' }}"]', 1, "NUL character"),
    ],
)
def test_a_template_that_fails_for_any_worker_fails_the_plan(
    command: str, index: int, message: str
) -> None:
    """Loading or planning (check-config does both) fails on a bad template, not a spawn."""
    with pytest.raises(ConfigError) as caught:
        plan_workers(make_feed(command, pipes=4, workers=4), {})
    assert caught.value.key_path == f"feeds.feed.command[{index}]"
    assert message in caught.value.message


def test_the_variables_describe_the_worker_and_its_pipes() -> None:
    """A worker gets its name, index, count, fds from 3, pipe indexes, workdir and interpreter."""
    feed = make_feed(pipes=10, workers=3)
    variables = worker_variables(feed, 2, "/var/lib/tradebalancer/feed")
    assert variables == {
        "feed": "feed",
        "worker": 2,
        "workers": 3,
        "fds": [3, 4, 5, 6],
        "pipes": [6, 7, 8, 9],
        "pipe_count": 10,
        "workdir": "/var/lib/tradebalancer/feed",
        "python": sys.executable,
    }
    assert sorted(variables) == sorted(KNOWN_VARIABLES)


def test_append_adds_the_fds_after_the_rendered_arguments() -> None:
    """pass_fds = "append" ends the argv with one read-fd number per pipe, as the C original."""
    feed = make_feed('["{{ python }}", "-m", "w", "--name", "{{ feed }}-{{ worker }}"]', pipes=6)
    feed_two = make_feed('["w", "{{ fds | join(\',\') }}"]', pipes=6, workers=2)
    assert argv_for(feed_two, 1, ".") == ["w", "3,4,5", "3", "4", "5"]
    workers = feed.workers
    for worker in range(workers):
        count = len(pipes_for_worker(feed, worker))
        assert argv_for(feed, worker, ".") == [
            sys.executable,
            "-m",
            "w",
            "--name",
            f"feed-{worker}",
            *(str(fd) for fd in range(3, 3 + count)),
        ]


def test_none_adds_nothing() -> None:
    """pass_fds = "none" leaves the rendered arguments alone."""
    feed = make_feed(
        '["w", "--fds={{ fds | join(\',\') }}"]', pipes=4, workers=1, pass_fds='"none"'
    )
    assert argv_for(feed, 0, ".") == ["w", "--fds=3,4,5,6"]


def test_each_element_stays_one_argument_verbatim() -> None:
    """No shell and no escaping: spaces, quotes and markup reach the program as written."""
    feed = make_feed(
        '["{{ python }}", "-c", "import sys; print(repr(sys.argv[1:]))", '
        '"a b", "it\'s", "<&>", "{{ workdir }}"]',
        pipes=1,
    )
    argv = argv_for(feed, 0, "/tmp/with space")
    result = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
    assert result.stdout.strip() == repr(["a b", "it's", "<&>", "/tmp/with space", "3"])


@pytest.mark.parametrize(("pipe_count", "workers"), [(16, 2), (10, 3), (7, 7), (5, 1), (4096, 3)])
def test_several_workers_divide_the_pipes_in_contiguous_blocks(
    pipe_count: int, workers: int
) -> None:
    """Worker w reads [w*N//W, (w+1)*N//W): in order, every pipe once, sizes within one."""
    feed = make_feed(pipes=pipe_count, workers=workers)
    blocks = [pipes_for_worker(feed, worker) for worker in range(workers)]
    assert [pipe for block in blocks for pipe in block] == list(range(pipe_count))
    assert {len(block) for block in blocks} <= {pipe_count // workers, -(-pipe_count // workers)}
    for worker, block in enumerate(blocks):
        assert block[0] == worker * pipe_count // workers


@given(st.integers(1, 4096).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_the_division_covers_every_pipe_exactly_once(counts: tuple[int, int]) -> None:
    """For every N and W <= N the blocks are non-empty, ordered, even, and cover 0..N-1 once."""
    pipe_count, workers = counts
    blocks = [pipe_block(pipe_count, workers, worker) for worker in range(workers)]
    assert [pipe for block in blocks for pipe in block] == list(range(pipe_count))
    assert all(pipe_count // workers <= len(block) <= -(-pipe_count // workers) for block in blocks)


@pytest.mark.parametrize(("pipe_count", "workers", "worker"), [(4, 5, 0), (4, 2, 2), (4, 2, -1)])
def test_an_impossible_division_is_refused(pipe_count: int, workers: int, worker: int) -> None:
    """More workers than pipes, or a worker index out of range, is a ValueError."""
    with pytest.raises(ValueError, match="over 4 pipes"):
        pipe_block(pipe_count, workers, worker)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/tradebalancer/feed"}, "/var/lib/tradebalancer/feed"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a"),
        ({"STATE_DIRECTORY": ""}, "."),
        ({}, "."),
    ],
)
def test_the_default_working_directory_is_the_state_directory(
    environ: dict[str, str], expected: str
) -> None:
    """Unset, working_directory is systemd's first $STATE_DIRECTORY, else the current directory."""
    assert working_directory(make_feed(), environ) == expected


def test_a_working_directory_expands_variables_at_run_time() -> None:
    """${VAR} in working_directory takes its value from the environment given at run time."""
    feed = make_feed(working_directory='"${RUNTIME_DIRECTORY}/work"')
    assert working_directory(feed, {"RUNTIME_DIRECTORY": "/run/tb"}) == "/run/tb/work"
    with pytest.raises(ConfigError) as caught:
        working_directory(feed, {})
    assert caught.value.key_path == "feeds.feed.working_directory"
    assert "${RUNTIME_DIRECTORY}, which is not set" in caught.value.message


def test_each_worker_gets_a_clean_environment_that_names_its_fds() -> None:
    """The plan drops the manager's channels and secrets and adds feed, worker index and fds."""
    feed = make_feed(pipes=5, workers=2, api_key_env='["MY_KEY"]')
    environ = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/x",
        "WATCHDOG_USEC": "1",
        "CREDENTIALS_DIRECTORY": "/run/credentials/x",
        "MASSIVE_API_KEY": "k",
        "POLYGON_API_KEY": "k",
        "MY_KEY": "k",
        "STATE_DIRECTORY": "/var/lib/tradebalancer/feed",
    }
    first, second = plan_workers(feed, environ)
    assert first.env == {
        "PATH": "/usr/bin",
        "STATE_DIRECTORY": "/var/lib/tradebalancer/feed",
        "TRADEBALANCER_FEED": "feed",
        "TRADEBALANCER_WORKER": "0",
        "TRADEBALANCER_FDS": "3,4",
    }
    assert second.env["TRADEBALANCER_FDS"] == "3,4,5"
    assert (first.pipes, second.pipes) == ((0, 1), (2, 3, 4))
    assert first.cwd == second.cwd == "/var/lib/tradebalancer/feed"
    assert first.argv == ("worker", "3", "4")
    assert clean_environment({"A": "1", "B": "2"}, ["B"]) == {"A": "1"}


def make_remote_feed(partitions: str, **keys: object) -> FeedConfig:
    """A feed with ``[feeds.feed.jetstream]`` publishing ``partitions`` (TOML) to one server."""
    lines = [f"{key} = {value}" for key, value in keys.items()]
    return config.loads(
        "\n".join(
            [
                "[feeds.feed]",
                'command = ["worker"]',
                *lines,
                "[feeds.feed.jetstream]",
                'servers = ["nats://10.0.0.5:4222"]',
                'credentials_file = "${CREDENTIALS_DIRECTORY}/nats.creds"',
                f"partitions = {partitions}",
            ]
        )
    ).feed("feed")


def test_remote_partitions_go_to_one_trusted_bridge_and_the_rest_to_the_workers() -> None:
    """The workers share the local pipes in blocks; the bridge gets the remote ones, uncovered."""
    feed = make_remote_feed("[1, 4, 5]", pipes=7, workers=2)
    plans = plan_workers(feed, {"CREDENTIALS_DIRECTORY": "/run/credentials/x"})
    assert [(plan.pipes, plan.trusted) for plan in plans] == [
        ((0, 2), False),
        ((3, 6), False),
        ((1, 4, 5), True),
    ]
    bridge = plans[2]
    assert bridge.argv[1:3] == ("-m", "tradebalancer.bridge")
    assert "--partitions" in bridge.argv
    assert bridge.argv[bridge.argv.index("--partitions") + 1] == "1,4,5"
    assert bridge.argv[-2:] == ("--credentials", "/run/credentials/x/nats.creds")
    assert bridge.env["TRADEBALANCER_FDS"] == "3,4,5"
    assert plans[1].argv == ("worker", "3", "4")


def test_all_partitions_remote_leaves_the_bridge_alone() -> None:
    """partitions = "all" plans no local worker, only the bridge over every pipe."""
    plans = plan_workers(make_remote_feed('"all"', pipes=3), {"CREDENTIALS_DIRECTORY": "/c"})
    assert [(plan.index, plan.pipes, plan.trusted) for plan in plans] == [(0, (0, 1, 2), True)]


def test_a_credentials_path_with_an_unset_variable_fails_the_plan() -> None:
    """The credentials file's ${VAR} must be set in the service's environment."""
    with pytest.raises(ConfigError) as caught:
        plan_workers(make_remote_feed("[0]", pipes=3), {})
    assert caught.value.key_path == "feeds.feed.jetstream.credentials_file"
