"""The line a job ends on when vLLM's engine core cannot start (pipeline.engine.start_failure):
the engine core's own error from the log it wrote, never vLLM's "See root cause above"."""

import pytest

from pipeline.engine.start_failure import INIT_FAILED, last_error_line, root_cause

pytestmark = pytest.mark.unit

ENGINE_CORE_LOG = """\
\x1b[36m(EngineCore pid=9)\x1b[0m INFO 12-06 19:59:20 [core.py:95] Initializing a V1 LLM engine
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/vllm/v1/engine/core.py", line 700, in run_engine_core
    raise ValueError(
\x1b[36m(EngineCore pid=9)\x1b[0m ValueError: No available memory for the cache blocks. Try more memory.
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/vllm/v1/engine/utils.py", line 900, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""


def test_the_engine_cores_error_is_found_past_vllms_generic_line():
    expected = "ValueError: No available memory for the cache blocks. Try more memory."
    assert last_error_line(ENGINE_CORE_LOG) == expected  # colored, with vLLM's process prefix
    plain = ENGINE_CORE_LOG.replace("\x1b[36m(EngineCore pid=9)\x1b[0m ", "")
    assert last_error_line(plain) == expected
    assert last_error_line(plain.replace(expected, "")) is None  # only vLLM's generic line: nothing better


def test_only_vllms_start_failure_is_explained_and_only_from_a_log_file():
    assert root_cause(RuntimeError("boom"), 0) is None  # any other error is left as it is
    assert root_cause(RuntimeError(INIT_FAILED), None) is None  # stderr is not a file: nothing to read
