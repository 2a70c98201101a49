"""async def rewards are awaited concurrently; synchronous ones run in a process pool with reward_workers; the
time limit and the one-line errors hold for both (timed with wide margins: 1 s sleeps)."""

from __future__ import annotations

import time

import pytest

from grouprl.errors import UserError
from grouprl.rewards import RewardSet

ASYNC = '''
import asyncio

async def slow_a(prompts, completions, **kw):
    await asyncio.sleep(1.0)
    return [1.0] * len(completions)

async def slow_b(prompts, completions, answer, **kw):
    await asyncio.sleep(1.0)
    return [float(a) for a in answer]

async def per_completion(prompts, completions, **kw):
    async def one(c):
        await asyncio.sleep(1.0)  # e.g. one API call per completion
        return float(len(c))
    return await asyncio.gather(*(one(c) for c in completions))

async def hangs(prompts, completions, **kw):
    await asyncio.sleep(60)

async def raises(prompts, completions, **kw):
    raise ValueError("judge said no\\nsecond line")

async def exits(prompts, completions, **kw):
    raise SystemExit(3)

async def interrupts(prompts, completions, **kw):
    raise KeyboardInterrupt
'''

SYNC = '''
import os, time

def slow(prompts, completions, **kw):
    time.sleep(0.5 * len(completions))
    return [float(len(c)) for c in completions]

def pid(prompts, completions, **kw):
    return [float(os.getpid())] * len(completions)

def hangs(prompts, completions, **kw):
    time.sleep(60)

def raises(prompts, completions, **kw):
    raise KeyError("missing")

def spawns(prompts, completions, **kw):
    import subprocess
    child = subprocess.Popen(["sleep", "600"])
    return [float(child.pid)] * len(completions)
'''


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "a.py").write_text(ASYNC)
    (tmp_path / "s.py").write_text(SYNC)
    return tmp_path


def test_async_rewards_are_awaited_concurrently(files):
    names = [f"{files}/a.py:slow_a", f"{files}/a.py:slow_b", f"{files}/a.py:per_completion"]
    rs = RewardSet([(n, 1.0) for n in names], timeout_s=10)
    try:
        t0 = time.perf_counter()
        per_fn, total = rs.score(["p"] * 4, ["a", "bb", "ccc", "dddd"], {"answer": ["1", "0", "1", "0"]})
        took = time.perf_counter() - t0
    finally:
        rs.close()
    # one after another: 1 + 1 + 4 x 1 = 6 s; concurrently: about 1 s
    assert took < 2.5, took
    assert per_fn.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 2.0], [1.0, 1.0, 3.0], [1.0, 0.0, 4.0]]


def test_async_reward_timeout_and_error_are_one_line(files):
    rs = RewardSet([(f"{files}/a.py:hangs", 1.0)], timeout_s=0.3)
    try:
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=r"reward function '.*a.py:hangs' took longer than 0.3s on 2 completions"):
            rs.score(["p", "p"], ["x", "y"], {})
        assert time.perf_counter() - t0 < 2.0
    finally:
        rs.close()
    rs = RewardSet([(f"{files}/a.py:raises", 1.0)])
    with pytest.raises(UserError) as e:
        rs.score(["p"], ["x"], {})
    rs.close()
    assert str(e.value) == f"reward function '{files}/a.py:raises' raised ValueError: judge said no"


def test_sync_rewards_run_in_worker_processes(files):
    import os

    rs = RewardSet([(f"{files}/s.py:pid", 1.0), ("correctness", 1.0)], workers=2)
    try:
        per_fn, _ = rs.score(["p"] * 4, ["<answer>\n1\n</answer>", "x", "<answer>2</answer>", "y"],
                             {"answer": ["1", "1", "2", "3"]})
        pids = set(per_fn[:, 0].tolist())
        assert float(os.getpid()) not in pids  # scored in the workers, not in this process
        assert per_fn[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]  # built-ins run there too, with the same result
        rs2 = RewardSet([(f"{files}/s.py:slow", 1.0)], workers=2)
        try:
            rs2.score(["p"] * 2, ["a", "b"], {})  # start-up: the workers import grouprl once
            t0 = time.perf_counter()
            per_fn, _ = rs2.score(["p"] * 4, ["a", "bb", "ccc", "dddd"], {})
            took = time.perf_counter() - t0
        finally:
            rs2.close()
        assert per_fn[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
        assert took < 1.7, took  # in the training process: 4 x 0.5 = 2 s; two workers, 2 each: about 1 s
    finally:
        rs.close()


def test_worker_timeout_and_error_are_one_line(files):
    rs = RewardSet([(f"{files}/s.py:raises", 1.0)], workers=2)
    try:
        with pytest.raises(UserError) as e:
            rs.score(["p"] * 2, ["x", "y"], {})
        assert str(e.value) == f"reward function '{files}/s.py:raises' raised KeyError: 'missing'"
    finally:
        rs.close()
    rs = RewardSet([(f"{files}/s.py:hangs", 1.0)], timeout_s=0.5, workers=1)
    try:
        with pytest.raises(UserError, match=r"took longer than 0.5s"):
            rs.score(["p"], ["x"], {})
    finally:
        rs.close()


@pytest.mark.parametrize("fn, said", [("exits", "called exit(3)"), ("interrupts", "raised KeyboardInterrupt")])
def test_an_async_reward_that_exits_is_one_line_and_the_event_loop_lives_on(files, fn, said):
    # a SystemExit that left its task would end the event loop's thread: the wait would run out the limit
    rs = RewardSet([(f"{files}/a.py:{fn}", 1.0)], timeout_s=5)
    try:
        for _ in range(2):
            with pytest.raises(UserError) as e:
                rs.score(["p"], ["x"], {})
            assert str(e.value).startswith(f"reward function '{files}/a.py:{fn}' {said}: a reward function must")
    finally:
        rs.close()


def test_a_reward_workers_children_end_with_the_run(files):
    import os
    import signal

    rs = RewardSet([(f"{files}/s.py:spawns", 1.0)], workers=1)
    try:
        per_fn, _ = rs.score(["p"], ["x"], {})
    finally:
        rs.close()
    child = int(per_fn[0, 0])
    for _ in range(100):  # the worker's group was sent SIGKILL: the child is gone once its parent reaps it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":  # killed, waiting for a parent that left
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the reward's child process outlived the run")
