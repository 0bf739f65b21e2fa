"""Loading rewards from recipe specs (short name, file path, import path) and the fault guard around each one."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from vlcot_grpo.rewards import (
    REWARDS,
    FidelityReward,
    FormatReward,
    GuardedReward,
    RewardError,
    RewardSpec,
    guard_reward,
    load_rewards,
)

CUSTOM_REWARD_SOURCE = textwrap.dedent(
    '''
    class LengthReward:
        """Longer completions score higher, up to ``cap`` characters."""

        def __init__(self, cap=10):
            self.cap = cap
            self.__name__ = "length"

        def __call__(self, prompts, completions, completion_ids, **kwargs):
            return [min(len(c), self.cap) / self.cap for c in completions]


    def shouting(prompts, completions, completion_ids, bonus=0.0, **kwargs):
        return [float(c.isupper()) + bonus for c in completions]
    '''
)


def call(reward, completions, **columns):
    n = len(completions)
    return reward(prompts=[""] * n, completions=completions, completion_ids=[[]] * n, **columns)


class Logs:
    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def __call__(self, name, value):
        self.values.setdefault(name, []).append(value)


# ----- loading ---------------------------------------------------------------------------------------------------


def test_short_names_with_kwargs_and_weights():
    rewards, weights = load_rewards(
        ["format", {"name": "fidelity", "weight": 0.5, "kwargs": {"metric": "ssim", "hr_weight": 0.0}}]
    )
    assert weights == [1.0, 0.5]
    assert [r.__name__ for r in rewards] == ["format", "fidelity"]
    assert all(isinstance(r, GuardedReward) for r in rewards)
    assert isinstance(rewards[0].reward, FormatReward)
    assert isinstance(rewards[1].reward, FidelityReward) and rewards[1].reward.metric == "ssim"
    assert set(REWARDS) == {"format", "degradation", "understanding", "generation", "fidelity"}


def test_rewards_are_not_torch_modules():
    # TRL treats an nn.Module reward as a reward *model* (tokenises text for it), and ZeRO-3 would partition it.
    rewards, _ = load_rewards(list(REWARDS))
    assert not any(isinstance(r, torch.nn.Module) or isinstance(r.reward, torch.nn.Module) for r in rewards)


def test_file_path_relative_and_absolute(tmp_path, monkeypatch):
    folder = tmp_path / "rewards"
    folder.mkdir()
    (folder / "my_reward.py").write_text(CUSTOM_REWARD_SOURCE)
    monkeypatch.chdir(tmp_path)
    rewards, weights = load_rewards(
        [
            {"name": "rewards/my_reward.py:LengthReward", "kwargs": {"cap": 4}, "weight": 2.0},
            {"name": f"{folder / 'my_reward.py'}:shouting", "kwargs": {"bonus": 0.5}},
        ]
    )
    assert weights == [2.0, 1.0]
    assert [r.__name__ for r in rewards] == ["length", "shouting"]
    assert call(rewards[0], ["ab", "abcdefgh"]) == [0.5, 1.0]
    assert call(rewards[1], ["HEY", "hey"]) == [1.5, 0.5]


def test_import_path(tmp_path, monkeypatch):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(CUSTOM_REWARD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards, _ = load_rewards([{"name": "my_pkg.mod:shouting"}, RewardSpec("my_pkg.mod:LengthReward", {"cap": 2})])
    assert call(rewards[0], ["YES", "no"]) == [1.0, 0.0]
    assert call(rewards[1], ["a", "abc"]) == [0.5, 1.0]


def test_typo_lists_available_names_and_suggests_the_closest():
    with pytest.raises(ValueError) as info:
        load_rewards(["fromat"])
    message = str(info.value)
    assert "'fromat'" in message and "Did you mean 'format'?" in message
    assert all(name in message for name in REWARDS)


def test_missing_file_attribute_module_and_bad_kwargs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        load_rewards([f"{tmp_path}/nowhere.py:Reward"])
    (tmp_path / "r.py").write_text(CUSTOM_REWARD_SOURCE)
    with pytest.raises(AttributeError, match=r"no attribute 'Missing'.*LengthReward"):
        load_rewards([f"{tmp_path}/r.py:Missing"])
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg"):
        load_rewards(["no_such_pkg.mod:fn"])
    with pytest.raises(TypeError, match="'format'.*partial"):
        load_rewards([{"name": "format", "kwargs": {"partial": True}}])
    with pytest.raises(ValueError, match="unknown keys.*'weights'"):
        load_rewards([{"name": "format", "weights": 2}])
    with pytest.raises(ValueError, match="'format': weight must be a finite number, got 'heavy'"):
        load_rewards([{"name": "format", "weight": "heavy"}])
    with pytest.raises(ValueError, match="'format': kwargs must be a dict"):
        load_rewards([{"name": "format", "kwargs": ["partial_credit"]}])


def test_a_reward_called_without_the_parsed_completions_says_what_it_needs():
    (format_reward,), _ = load_rewards(["format"])
    with pytest.raises(RewardError, match="'format' raised on sample 0: ValueError: .*'vlcot'"):
        call(format_reward, ["<degradation>"])


def test_duplicate_names_are_made_unique_and_labels_apply():
    rewards, _ = load_rewards(["fidelity", {"name": "fidelity", "kwargs": {"metric": "ssim"}}, "fidelity"])
    assert [r.__name__ for r in rewards] == ["fidelity", "fidelity_2", "fidelity_3"]
    rewards, _ = load_rewards([{"name": "fidelity", "label": "lr_consistency"}])
    assert rewards[0].__name__ == "lr_consistency"


# ----- faults ----------------------------------------------------------------------------------------------------


def fails_on_the_word_boom(prompts, completions, completion_ids, **kwargs):
    return [1.0 / (0 if "boom" in c else 1) for c in completions]


def test_a_raising_reward_names_itself_and_the_sample():
    guarded = guard_reward(fails_on_the_word_boom, "boom_detector")
    with pytest.raises(RewardError, match=r"reward 'boom_detector' raised on sample 2: ZeroDivisionError") as info:
        call(guarded, ["fine", "ok", "boom", "boom"], tags=[["a"], ["b"], ["c"], ["d"]], log_metric=Logs())
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_batch_only_failure_is_reported_as_such():
    def needs_a_pair(prompts, completions, completion_ids, **kwargs):
        if len(completions) < 2:
            return [0.0] * len(completions)
        raise RuntimeError("pairs are broken")

    with pytest.raises(RewardError, match="on a batch of 2 .but on no single sample.*pairs are broken"):
        call(guard_reward(needs_a_pair, "pairs"), ["a", "b"])


def test_nan_and_inf_become_none_and_are_counted():
    def unstable(prompts, completions, completion_ids, **kwargs):
        return [0.5, math.nan, math.inf, None]

    logs = Logs()
    with pytest.warns(RuntimeWarning, match="'unstable' returned NaN/inf for 2 of 4"):
        scores = call(guard_reward(unstable, "unstable"), ["a", "b", "c", "d"], log_metric=logs)
    assert scores == [0.5, None, None, None]
    assert logs.values == {"rewards/unstable/nan_count": [2.0]}
    # Outside the trainer there is no log_metric: still works.
    with pytest.warns(RuntimeWarning):
        assert call(guard_reward(unstable, "unstable"), ["a", "b", "c", "d"]) == [0.5, None, None, None]


def test_wrong_length_and_wrong_type_are_errors():
    def too_short(prompts, completions, completion_ids, **kwargs):
        return [1.0] * (len(completions) - 1)

    def says_yes(prompts, completions, completion_ids, **kwargs):
        return ["yes"] * len(completions)

    with pytest.raises(RewardError, match=r"reward 'too_short' returned 2 values for 3 completions"):
        call(guard_reward(too_short), ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"'says_yes' returned 'yes' \(str\) for sample 0"):
        call(guard_reward(says_yes), ["a"])


def test_guard_keeps_the_name_forwards_prepare_and_accepts_tensors():
    class Prepared:
        __name__ = "prepared"

        def __init__(self):
            self.device = None

        def prepare(self, device):
            self.device = device

        def __call__(self, prompts, completions, completion_ids, **kwargs):
            return torch.ones(len(completions))

    inner = Prepared()
    guarded = guard_reward(inner)
    guarded.prepare("cpu")
    assert guarded.__name__ == "prepared" and inner.device == "cpu"
    assert call(guarded, ["a", "b"]) == [1.0, 1.0]
    guard_reward(fails_on_the_word_boom).prepare("cpu")  # no prepare on the inner reward: nothing to do
    assert guard_reward(guarded, "renamed").reward is inner  # never wrapped twice


def test_a_failure_that_needs_its_batch_names_the_sample_that_joins_it():
    """Sample 2 fails only in a batch of three or more (a reward that reads a batch-level statistic, say): no sample
    fails alone, but the report names sample 2."""

    def breaks_after_two(prompts, completions, completion_ids, **kwargs):
        if len(completions) > 2 and completions[2] == "x":
            raise RuntimeError("third")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"no single sample\); it first fails when sample 2 joins samples 0-1"):
        call(guard_reward(breaks_after_two, "batchy"), ["a", "b", "x", "d"])


def test_tensor_columns_are_split_per_sample_when_diagnosing():
    import torch

    def reads_a_tensor_column(prompts, completions, completion_ids, scores, **kwargs):
        if (scores < 0).any():
            raise ValueError("negative score")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match="on sample 2"):
        call(guard_reward(reads_a_tensor_column, "t"), ["a", "b", "c"], scores=torch.tensor([1.0, 2.0, -1.0]))


def test_the_documented_recipe_entries_load_through_the_grpo_script(tmp_path, monkeypatch):
    """The YAML that rewards/loader.py documents, in a recipe, through the GRPO script's parser and build_rewards:
    plain names and mappings with kwargs and weights, a file path and an import path."""
    import re
    import sys

    from vlcot_grpo import grpo
    from vlcot_grpo.rewards import loader

    block = re.search(r"\n( *rewards:\n(?: +- .*\n)+)", loader.__doc__)[1]
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "my_reward.py").write_text(CUSTOM_REWARD_SOURCE.replace("LengthReward", "MyReward"))
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "my_module.py").write_text(
        "def my_reward(completions, **kwargs):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_pkg", "my_pkg.my_module"):  # another test's my_pkg may be imported already
        monkeypatch.delitem(sys.modules, name, raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(block) + "output_dir: out\nbf16: false\nuse_cpu: true\n")
    script_args, training_args, _ = grpo.parse_args(["--config", str(recipe)])
    funcs = grpo.build_rewards(script_args, training_args)
    assert [f.__name__ for f in funcs] == ["format", "degradation", "length", "my_reward"]
    assert training_args.reward_weights == [1.0, 1.0, 0.5, 1.0]
    assert sys.modules["my_pkg.my_module"]
    # what the run saves of them rebuilds the same rewards (the demo's held-out check reads it back)
    from vlcot_grpo.heldout import run_rewards
    from vlcot_grpo.saved_settings import reward_records

    records = reward_records(script_args, training_args)
    assert [r["kwargs"] for r in records][1] == {"graded": True}
    again, weights = run_rewards({"rewards": records})
    assert [f.__name__ for f in again] == [f.__name__ for f in funcs]
    assert list(weights.values()) == [1.0, 1.0, 0.5, 1.0]
    weighted = recipe.read_text() + "reward_weights: [1, 1, 1, 1]\n"
    recipe.write_text(weighted)
    script_args, training_args, _ = grpo.parse_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match=r"rewards \['degradation', 'rewards/my_reward.py:MyReward'\] carry a weight"):
        grpo.build_rewards(script_args, training_args)
