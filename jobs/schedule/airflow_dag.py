"""An Airflow DAG running a qwen-batch job every night with the run's exit codes:

    0  success, partial (error rows within output.max_error_rate) or nothing to do
    1  failed: more error rows than output.max_error_rate      -> alert, no retry
    2  invalid spec or input, a replica no node can hold, or
       another run holds the output's lock; nothing ran        -> fail fast, alert, no retry
    3  stopped (crash, full disk, engines dying); committed
       shards are kept, a rerun resumes                        -> retry

BashOperator retries on every non-zero exit code, so the retries on 3 happen inside the
command (a rerun resumes where the last try stopped) and the task itself has retries=0:
exits 1 and 2 fail the task at once, and on_failure_callback alerts with the exit code. A
second task prints `qwen-batch status OUTPUT` into the task log whatever happened.

Copy this file into the DAGs folder of an Airflow (2.4 or later) whose workers have
qwen-batch installed; set QWEN_BATCH_HOME, the spec and OUTPUT below. Airflow is not needed
by qwen-batch or its tests (they only compile this file).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from airflow import DAG

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

QWEN_BATCH_HOME = "/srv/qwen-batch"  # the checkout with .venv
SPEC = "jobs/chat.yaml"
OUTPUT = "s3://my-bucket/qwen-batch/chat"  # the spec's output.path
TRIES_ON_EXIT_3 = 3
WAIT_BETWEEN_TRIES_S = 600

EXIT_MEANING = {
    1: "failed: more error rows than output.max_error_rate (every shard is committed; see errors/)",
    2: "invalid: the spec, the input, placement, or another run holds the output; nothing ran",
    3: f"stopped {TRIES_ON_EXIT_3} times (crash, full disk, engines dying); committed shards are kept",
}

# Run, retrying only while the run exits 3; exit with the last code for Airflow to see.
RUN = f"""
cd {QWEN_BATCH_HOME}
for try in $(seq {TRIES_ON_EXIT_3}); do
    .venv/bin/qwen-batch run {SPEC} --no-progress --set output.path={OUTPUT}
    rc=$?
    [ "$rc" -eq 3 ] || break
    [ "$try" -lt {TRIES_ON_EXIT_3} ] && echo "exit 3 (stopped): retrying in {WAIT_BETWEEN_TRIES_S} s" &&
        sleep {WAIT_BETWEEN_TRIES_S}
done
exit $rc
"""


def alert(context) -> None:
    """Called when the run task fails: say which exit code and what it means. Replace the
    logging call with your pager, Slack or e-mail hook."""
    found = re.search(r"exit code (\d+)", str(context.get("exception") or ""))
    code = int(found.group(1)) if found else None
    logging.getLogger("qwen-batch").error(
        "qwen-batch %s, exit %s: %s. `qwen-batch status %s` shows where it stands.",
        SPEC, code, EXIT_MEANING.get(code, "unexpected exit code"), OUTPUT)


with DAG(
    dag_id="qwen_batch_chat_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,  # the output's lock refuses a second run anyway (exit 2)
    default_args={"owner": "ml-platform"},
) as dag:
    run = BashOperator(
        task_id="run",
        bash_command=RUN,
        retries=0,  # retries on exit 3 happen in RUN; 1 and 2 must not be retried
        execution_timeout=timedelta(hours=12),
        on_failure_callback=alert,
    )
    status = BashOperator(
        task_id="status",
        bash_command=f"cd {QWEN_BATCH_HOME} && .venv/bin/qwen-batch status {OUTPUT}",
        trigger_rule="all_done",  # also after a failed run
    )
    run >> status
