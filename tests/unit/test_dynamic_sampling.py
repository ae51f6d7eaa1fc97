"""Dynamic-sampling buffer: filtering, exact hand-out, carrying, exhaustion, resume."""

from __future__ import annotations

import dataclasses
import io
import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dapo_megatron.algo import FILTER_METRICS
from dapo_megatron.algo.dynamic_sampling import DynamicSamplingBuffer, DynamicSamplingExhausted
from dapo_megatron.contract import Group

_UIDS = itertools.count()


def group(acc: list[float], uid: str | None = None, seq_reward: list[float] | None = None) -> Group:
    """A group whose score is 2 acc - 1 and whose shaped reward is the score unless given."""
    uid = uid if uid is not None else f"g{next(_UIDS)}"
    score = [2 * a - 1 for a in acc]
    return Group(
        uid=uid,
        prompt_ids=[1, 2],
        response_ids=[[10 + k] * (k + 1) for k in range(len(acc))],
        rollout_log_probs=[[-0.5] * (k + 1) for k in range(len(acc))],
        truncated=[False] * len(acc),
        acc=list(acc),
        score=score,
        seq_reward=score if seq_reward is None else seq_reward,
    )


def mixed(n: int) -> list[Group]:
    return [group([1.0, 0.0]) for _ in range(n)]


def flat(n: int) -> list[Group]:
    return [group([1.0, 1.0]) for _ in range(n)]


def roundtrip(buf: DynamicSamplingBuffer, **config) -> DynamicSamplingBuffer:
    stream = io.BytesIO()
    torch.save(buf.state_dict(), stream)
    stream.seek(0)
    restored = DynamicSamplingBuffer(buf.train_batch_size, **config)
    restored.load_state_dict(torch.load(stream, weights_only=False))
    return restored


# ----------------------------------------------------------------- filtering
def test_filter_rule_population_std_and_singletons() -> None:
    buf = DynamicSamplingBuffer(100, std_tolerance=0.1)
    buf.begin_step(0)
    keep = [
        group([1, 0]),
        group([1]),
        group([0.0, 0.3]),
    ]  # std 0.5, lone sample, std 0.15
    drop = [group([1, 1, 1]), group([0.0, 0.2])]  # std 0, std 0.1 (not > tolerance)
    buf.add_round(keep + drop)
    assert np.std([0.0, 0.2]) == pytest.approx(0.1)
    m = buf.metrics()
    assert (
        m["dynamic_sampling/kept_groups"],
        m["dynamic_sampling/filtered_groups"],
    ) == (3, 2)
    assert [g.uid for g in buf.pending] == [g.uid for g in keep]
    assert m["dynamic_sampling/generated_samples"] == 2 + 1 + 2 + 3 + 2


def test_float_noise_is_not_informative() -> None:
    buf = DynamicSamplingBuffer(4)
    buf.begin_step(0)
    buf.add_round([group([0.1 + 0.2, 0.3, 0.3])])  # 0.30000000000000004 vs 0.3
    assert len(buf) == 0


def test_filter_uses_chosen_metric_not_shaped_reward() -> None:
    buf = DynamicSamplingBuffer(4, metric="acc")
    buf.begin_step(0)
    # Equal accuracy, different shaped rewards (length penalties): not informative.
    buf.add_round([group([0.0, 0.0], seq_reward=[-1.0, -1.7])])
    assert len(buf) == 0
    by_reward = DynamicSamplingBuffer(4, metric="seq_reward")
    by_reward.begin_step(0)
    by_reward.add_round([group([0.0, 0.0], seq_reward=[-1.0, -1.7])])
    assert len(by_reward) == 1


def test_disabled_keeps_every_group() -> None:
    buf = DynamicSamplingBuffer(3, enable=False)
    buf.begin_step(0)
    buf.add_round(flat(3))
    assert buf.ready() and not buf.should_generate()
    assert len(buf.take()) == 3


def test_filter_metrics_are_group_fields() -> None:
    """The buffer reads the configured metric as a Group field of that name."""
    assert set(FILTER_METRICS) <= {f.name for f in dataclasses.fields(Group)}


def test_bad_values_name_uid_and_metric() -> None:
    buf = DynamicSamplingBuffer(2, metric="seq_reward")
    buf.begin_step(0)
    with pytest.raises(ValueError, match=r"'p-17'.*'seq_reward'"):
        buf.add_round([group([1, 0], uid="p-17", seq_reward=[0.5, float("inf")])])
    with pytest.raises(TypeError, match="contract.Group.*dict"):
        buf.add_round([{"uid": "p-18", "acc": [1.0, 0.0]}])


def test_bad_groups_leave_buffer_unchanged() -> None:
    buf = DynamicSamplingBuffer(4)
    buf.begin_step(0)
    buf.add_round([group([1, 0], uid="a")])
    before = buf.metrics()
    for bad in (
        [group([1, 0], uid="b"), group([0, 1], uid="a")],  # duplicate of a carried uid
        [group([1, 0], uid="c"), group([0, 1], uid="c")],  # duplicate within the round
        [group([1, 0], uid="d"), {"uid": "e"}],  # not a Group
        [group([1, 0], uid="f"), group([float("nan"), 1.0], uid="g")],  # non-finite
    ):
        with pytest.raises((ValueError, TypeError)):
            buf.add_round(bad)
    with pytest.raises(ValueError, match="duplicate"):
        buf.add_round([group([1, 0], uid="a")])
    assert buf.metrics() == before and [g.uid for g in buf.pending] == ["a"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"metric": "reward"}, "metric"),
        ({"on_exhausted": "skip"}, "on_exhausted"),
        ({"max_carry_age": -1}, "max_carry_age"),
        ({"max_num_gen_batches": -1}, "max_num_gen_batches"),
        ({"std_tolerance": -1e-3}, "std_tolerance"),
        ({"std_tolerance": float("nan")}, "std_tolerance"),
    ],
)
def test_constructor_validation(kwargs, name) -> None:
    args = {"train_batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        DynamicSamplingBuffer(args.pop("train_batch_size"), **args)


# ------------------------------------------------------------------ hand-out
def test_take_exact_oldest_first_and_carry() -> None:
    buf = DynamicSamplingBuffer(3, max_carry_age=1)
    buf.begin_step(0)
    first = mixed(2)
    buf.add_round(first + flat(2))
    assert buf.should_generate()
    second = mixed(3)
    buf.add_round(second)
    assert buf.ready() and not buf.should_generate()
    batch = buf.take()
    assert [g.uid for g in batch] == [g.uid for g in first + second[:1]]
    m = buf.metrics()
    assert m["train/num_gen_batches"] == 2
    assert m["dynamic_sampling/carried_groups"] == 2
    assert m["dynamic_sampling/trained_samples"] == 6
    assert m["dynamic_sampling/carried_in_groups"] == 0

    buf.begin_step(1)
    assert buf.metrics()["train/num_gen_batches"] == 0
    third = mixed(2)
    buf.add_round(third)
    batch = buf.take()
    assert [g.uid for g in batch] == [g.uid for g in second[1:] + third[:1]]
    assert buf.metrics()["dynamic_sampling/carried_in_groups"] == 2
    # third[1] was born in step 1: still young enough to carry into step 2.
    assert buf.metrics()["dynamic_sampling/carried_groups"] == 1


def test_max_carry_age_zero_discards_surplus_like_verl() -> None:
    buf = DynamicSamplingBuffer(2, max_carry_age=0)
    buf.begin_step(0)
    buf.add_round(mixed(5))
    assert len(buf.take()) == 2
    m = buf.metrics()
    assert m["dynamic_sampling/carried_groups"] == 0
    assert m["dynamic_sampling/expired_groups"] == 3


def test_carried_groups_expire_on_step_jump() -> None:
    buf = DynamicSamplingBuffer(2, max_carry_age=2)
    buf.begin_step(0)
    buf.add_round(mixed(3))
    buf.take()
    buf.begin_step(5)
    assert len(buf) == 0
    assert buf.metrics()["dynamic_sampling/expired_groups"] == 1


def test_step_order_and_take_protocol() -> None:
    buf = DynamicSamplingBuffer(2)
    with pytest.raises(RuntimeError, match="begin_step"):
        buf.add_round(mixed(1))
    buf.begin_step(3)
    with pytest.raises(ValueError, match="step must increase"):
        buf.begin_step(3)
    buf.add_round(mixed(1))
    with pytest.raises(RuntimeError, match="should_generate") as info:
        buf.take()
    assert not isinstance(info.value, DynamicSamplingExhausted)
    buf.add_round(mixed(3))
    buf.take()
    with pytest.raises(RuntimeError, match="after take"):
        buf.take()
    with pytest.raises(RuntimeError, match="after take"):
        buf.add_round(mixed(1))


def test_exhausted_raises_with_actionable_message() -> None:
    buf = DynamicSamplingBuffer(4, max_num_gen_batches=2)
    buf.begin_step(7)
    buf.add_round(mixed(1) + flat(3))
    buf.add_round(flat(4))
    assert not buf.should_generate()
    with pytest.raises(DynamicSamplingExhausted) as info:
        buf.take()
    msg = str(info.value)
    for part in (
        "step 7",
        "1 of 4 groups",
        "2 generation rounds",
        "max_num_gen_batches",
        "gen_batch_size",
        "train_batch_size",
        "train_partial",
    ):
        assert part in msg
    assert isinstance(info.value, RuntimeError)


def test_exhausted_train_partial(caplog: pytest.LogCaptureFixture) -> None:
    buf = DynamicSamplingBuffer(4, max_num_gen_batches=1, on_exhausted="train_partial")
    buf.begin_step(0)
    kept = mixed(3)
    buf.add_round(kept + flat(5))
    with caplog.at_level("WARNING", logger="dapo_megatron.algo.dynamic_sampling"):
        batch = buf.take()
    assert "3 of 4 groups kept after 1 generation rounds" in caplog.text
    assert "training on the partial batch" in caplog.text
    assert [g.uid for g in batch] == [g.uid for g in kept]
    m = buf.metrics()
    assert m["dynamic_sampling/partial_batch"] == 1
    assert m["dynamic_sampling/filtered_groups"] == 5
    buf.begin_step(1)
    assert buf.metrics()["dynamic_sampling/partial_batch"] == 0
    buf.add_round(flat(2))
    with pytest.raises(DynamicSamplingExhausted, match="no group"):
        buf.take()


def test_unlimited_rounds_never_exhaust() -> None:
    buf = DynamicSamplingBuffer(1, max_num_gen_batches=0)
    buf.begin_step(0)
    for _ in range(50):
        buf.add_round(flat(2))
    assert buf.should_generate()


# ------------------------------------------------------------------- resume
def _drive(buf: DynamicSamplingBuffer, steps: range, seed: int) -> list:
    """Run steps with rounds drawn from a seeded RNG; record everything observable."""
    rng = random.Random(seed)
    log = []
    for step in steps:
        buf.begin_step(step)
        rounds = 0
        while buf.should_generate():
            p_correct = rng.choice([0.0, 0.5])  # some rounds are all-wrong, i.e. dry
            groups = [
                group(
                    [float(rng.random() < p_correct) for _ in range(rng.randint(1, 3))],
                    uid=f"s{step}r{rounds}q{q}",
                )
                for q in range(rng.randint(0, 6))
            ]
            buf.add_round(groups)
            rounds += 1
        try:
            batch = buf.take()
            log.append([dataclasses.asdict(g) for g in batch])
        except DynamicSamplingExhausted as err:
            log.append(str(err))
        log.append(buf.metrics())
    return log


@pytest.mark.parametrize("on_exhausted", ["raise", "train_partial"])
def test_state_dict_roundtrip_continues_identically(on_exhausted: str) -> None:
    config = {
        "max_num_gen_batches": 3,
        "max_carry_age": 2,
        "on_exhausted": on_exhausted,
    }
    original = DynamicSamplingBuffer(3, **config)
    _drive(original, range(3), seed=0)
    assert len(original) > 0, "the scenario should leave carried groups to checkpoint"
    restored = roundtrip(original, **config)
    assert restored.metrics() == original.metrics()
    continued = _drive(restored, range(3, 8), seed=1)
    assert continued == _drive(original, range(3, 8), seed=1)
    # The seeds are chosen so the continuation uses carried groups and runs dry once.
    metrics = [x for x in continued if isinstance(x, dict)]
    assert any(m["dynamic_sampling/carried_in_groups"] > 0 for m in metrics)
    if on_exhausted == "raise":
        assert any(isinstance(x, str) for x in continued)
    else:
        assert any(m["dynamic_sampling/partial_batch"] == 1 for m in metrics)


def test_state_dict_loads_with_weights_only_and_round_trips_the_groups() -> None:
    buf = DynamicSamplingBuffer(1, max_carry_age=1)
    buf.begin_step(4)
    buf.add_round(mixed(3))
    buf.take()
    stream = io.BytesIO()
    torch.save(buf.state_dict(), stream)
    stream.seek(0)
    state = torch.load(stream, weights_only=True)
    other = DynamicSamplingBuffer(1, max_carry_age=1)
    other.load_state_dict(state)
    assert [g.born_step for g in other.pending] == [4, 4]
    assert other.pending == buf.pending and all(isinstance(g, Group) for g in other.pending)
    with pytest.raises(ValueError, match="step must increase"):
        other.begin_step(4)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})


def test_version_1_state_loads_into_typed_groups() -> None:
    """Checkpoints whose groups kept their values in a metrics dict and their samples in a payload."""
    g = dataclasses.replace(group([1, 0], uid="p@3.0.1"), born_step=3)
    payload = {"prompt_ids": g.prompt_ids, "response_ids": g.response_ids, "data_source": "s",
               "rollout_log_probs": g.rollout_log_probs, "truncated": g.truncated}  # fmt: skip
    metrics = {"acc": g.acc, "score": g.score, "seq_reward": g.seq_reward}
    v1 = {"version": 1, "step": 3, "taken": True, "counters": {"kept_groups": 2},
          "groups": [{"uid": g.uid, "metrics": metrics, "payload": payload, "born_step": 3}]}  # fmt: skip
    buf = DynamicSamplingBuffer(1, max_carry_age=1)
    buf.load_state_dict(v1)
    assert buf.pending == (g,) and buf.state_dict()["version"] == 2
    v1["groups"][0]["payload"] = {"ids": [0, 1]}  # a payload the trainer never wrote
    with pytest.raises(ValueError, match=r"'p@3.0.1' is not a version-1 trainer group"):
        buf.load_state_dict(v1)


# ----------------------------------------------------- randomised invariants
def informative(g: Group, metric: str, tol: float) -> bool:
    values = getattr(g, metric)
    return len(values) == 1 or float(np.std(values)) > tol


class BufferMachine(RuleBasedStateMachine):
    """Random interleavings of rounds, takes, step changes and checkpoint resumes."""

    @initialize(
        tbs=st.integers(1, 4),
        max_gen=st.integers(0, 3),
        carry=st.integers(0, 2),
        on_exhausted=st.sampled_from(["raise", "train_partial"]),
        enable=st.booleans(),
        metric=st.sampled_from(["acc", "score"]),
    )
    def setup(self, tbs, max_gen, carry, on_exhausted, enable, metric) -> None:
        self.config = {
            "max_num_gen_batches": max_gen,
            "max_carry_age": carry,
            "on_exhausted": on_exhausted,
            "enable": enable,
            "metric": metric,
        }
        self.buf = DynamicSamplingBuffer(tbs, **self.config)
        self.step = 0
        self.buf.begin_step(0)
        self.taken = False
        self.kept: set[str] = set()
        self.filtered: set[str] = set()
        self.handed: set[str] = set()
        self.expired_before = 0
        self.step_groups = 0
        self.step_samples = 0
        self.step_rounds = 0
        self.next_uid = 0

    def _should_keep(self, g: Group) -> bool:
        return not self.config["enable"] or informative(g, self.config["metric"], 1e-6)

    @precondition(lambda self: not self.taken)
    @rule(sizes=st.lists(st.integers(1, 4), max_size=4), data=st.data())
    def add_round(self, sizes, data) -> None:
        groups = []
        for n in sizes:
            acc = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
            groups.append(group(acc, uid=f"u{self.next_uid}"))
            self.next_uid += 1
        self.buf.add_round(groups)
        for g in groups:
            (self.kept if self._should_keep(g) else self.filtered).add(g.uid)
            assert g.born_step == self.step or g.uid in self.filtered
        self.step_groups += len(groups)
        self.step_samples += sum(sizes)
        self.step_rounds += 1

    @precondition(lambda self: not self.taken and (self.buf.ready() or not self.buf.rounds_left()))
    @rule()
    def take(self) -> None:
        was_ready = self.buf.ready()
        available = len(self.buf)
        try:
            batch = self.buf.take()
        except DynamicSamplingExhausted as err:
            assert not was_ready
            assert self.config["on_exhausted"] == "raise" or available == 0
            assert "max_num_gen_batches" in str(err)
            return
        self.taken = True
        uids = [g.uid for g in batch]
        assert len(set(uids)) == len(uids)
        if was_ready:
            assert len(batch) == self.buf.train_batch_size
        else:
            assert self.config["on_exhausted"] == "train_partial"
            assert 0 < len(batch) < self.buf.train_batch_size
            assert self.buf.metrics()["dynamic_sampling/partial_batch"] == 1
        assert set(uids) <= self.kept, "handed out a filtered group"
        assert not set(uids) & self.handed, "handed out a group twice"
        born = [g.born_step for g in batch]
        assert born == sorted(born), "not oldest first"
        assert all(self.step - b <= self.config["max_carry_age"] for b in born)
        m = self.buf.metrics()
        assert m["dynamic_sampling/carried_in_groups"] == sum(b < self.step for b in born)
        assert m["dynamic_sampling/trained_samples"] == sum(g.size for g in batch)
        self.handed |= set(uids)

    @precondition(lambda self: not self.taken and not self.buf.ready() and self.buf.rounds_left())
    @rule()
    def take_too_early(self) -> None:
        try:
            self.buf.take()
        except DynamicSamplingExhausted:  # pragma: no cover - would be a bug
            raise AssertionError("exhausted although rounds remain") from None
        except RuntimeError:
            return
        raise AssertionError("take() succeeded without enough groups")

    @rule(jump=st.integers(1, 3))
    def next_step(self, jump) -> None:
        self.expired_before += int(self.buf.metrics()["dynamic_sampling/expired_groups"])
        self.step += jump
        self.buf.begin_step(self.step)
        self.taken = False
        self.step_groups = self.step_samples = self.step_rounds = 0

    @rule()
    def resume_from_checkpoint(self) -> None:
        before = self.buf.metrics()
        self.buf = roundtrip(self.buf, **self.config)
        assert self.buf.metrics() == before

    @invariant()
    def accounting(self) -> None:
        m = self.buf.metrics()
        carried = {g.uid for g in self.buf.pending}
        assert carried <= self.kept - self.handed
        expired = self.expired_before + int(m["dynamic_sampling/expired_groups"])
        assert len(self.kept) == len(self.handed) + len(carried) + expired, "lost a kept group"
        assert m["dynamic_sampling/carried_groups"] == len(carried)
        assert all(self.step - g.born_step <= self.config["max_carry_age"] for g in self.buf.pending)
        assert m["dynamic_sampling/kept_groups"] + m["dynamic_sampling/filtered_groups"] == self.step_groups
        assert m["dynamic_sampling/generated_samples"] == self.step_samples
        assert m["train/num_gen_batches"] == self.step_rounds
        assert self.buf.should_generate() == (not self.buf.ready() and self.buf.rounds_left())


BufferMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)
TestBufferMachine = BufferMachine.TestCase
