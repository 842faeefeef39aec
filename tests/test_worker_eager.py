"""Rows start eagerly in the engine actor (pipeline.worker.start_eagerly): a row that needs
no engine round trip is done without an asyncio task; one that waits goes on as a task that
behaves as if the coroutine had been a task from the start (results, errors, cancellation)."""

import asyncio

import pytest

from pipeline.worker import start_eagerly

pytestmark = pytest.mark.unit


async def instant(x):
    return x * 2


async def waits(x, log):
    try:
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a future
        return x + 1
    finally:
        log.append("cleaned up")


async def fails_later():
    await asyncio.sleep(0.01)
    raise ValueError("late")


def test_a_coroutine_that_never_waits_is_done_without_a_task():
    async def main():
        done, value = start_eagerly(instant(21))
        assert done and value == 42
        assert len(asyncio.all_tasks()) == 1  # only main itself
    asyncio.run(main())


def test_a_waiting_coroutine_goes_on_as_a_task_with_its_result_and_errors():
    async def main():
        log = []
        done, task = start_eagerly(waits(1, log))
        assert not done and isinstance(task, asyncio.Future)
        assert await task == 2 and log == ["cleaned up"]
        done, task = start_eagerly(fails_later())
        with pytest.raises(ValueError, match="late"):
            await task
    asyncio.run(main())


def test_cancelling_the_task_cancels_the_row_coroutine():
    async def main():
        log = []
        done, task = start_eagerly(waits(1, log))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["cleaned up"]
    asyncio.run(main())


def test_rows_wait_concurrently():
    async def main():
        waiting, most = 0, 0

        async def row(i):
            nonlocal waiting, most
            waiting += 1
            most = max(most, waiting)
            await asyncio.sleep(0.01)
            waiting -= 1
            return i

        runs = [start_eagerly(row(i)) for i in range(50)]
        assert await asyncio.gather(*(t for _, t in runs)) == list(range(50))
        assert most == 50  # all rows were waiting at once, none ran after another
    asyncio.run(main())
