"""One reader of torchrun's environment: the analysis batch and the training loops agree on it,
and a malformed environment is a user mistake (exit 2), not a traceback."""
import pytest

from fmct.conventions.errors import ConfigError
from fmct.conventions.runtime import Rank, torchrun_rank
from fmct.train.distributed import DistInfo, init_from_env


@pytest.mark.parametrize("env, expected", [
    ({}, Rank(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Rank(3, 4, 1)),
    ({"RANK": "2", "WORLD_SIZE": "4"}, Rank(2, 4, 2)),  # no LOCAL_RANK: one node, the rank itself
])
def test_the_one_reader_of_the_place(env, expected):
    assert torchrun_rank(env) == expected


@pytest.mark.parametrize("env", [
    {"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "0"},
    {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"},
])
def test_a_malformed_environment_is_refused_by_both(env, monkeypatch):
    with pytest.raises(ConfigError, match="torchrun"):
        torchrun_rank(env)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="torchrun"):
        init_from_env("cpu")


def test_one_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert init_from_env("cpu") == DistInfo()
