"""Links a stage's flow run to the `pipeline` flow run whose stage task started it (through DVC, in another
process): the stage's flow run is created as a subflow run of that task run and tagged `parent:<flow run id>`.
Prefect bookkeeping only: the stage's flow function runs the same either way, so this module is not a dep of the
DVC stages (tests/test_dvc_deps.py, SIDE_EFFECT_ONLY); `flows.common.main()` imports it when a stage runs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from flows.common import one_line

PARENT_FLOW_RUN_ENV = "TSPO_PARENT_FLOW_RUN_ID"
PARENT_TASK_RUN_ENV = "TSPO_PARENT_TASK_RUN_ID"
"""Set by the `pipeline` flow for the DVC processes of a stage task: its flow run's and the task run's ids."""
LINK_TRIES = 6  # the parent task run is recorded by the server from events: it may lag the task's start a little


def run_stage_flow(flow: Any, kwargs: dict[str, Any], environ: Mapping[str, str] = os.environ) -> Any:
    """Call the stage flow with `kwargs`. Started by a `pipeline` stage task (`PARENT_*_ENV` set), its flow run is
    created as a subflow run of that task run (`parent_task_run_id`: the pipeline run's "Subflow runs", and the
    stage's node in its run graph) and tagged `parent:<pipeline flow run id>`, then run by Prefect's flow engine
    (what a worker does with a flow run created beforehand). If the link cannot be made the flow runs unlinked,
    tagged, after one warning line."""
    from prefect import Flow, tags

    parent_flow, parent_task = environ.get(PARENT_FLOW_RUN_ENV), environ.get(PARENT_TASK_RUN_ENV)
    if not isinstance(flow, Flow) or not parent_flow:
        return flow(**kwargs)
    with tags(f"parent:{parent_flow}"):
        run = _subflow_run(flow, kwargs, parent_task) if parent_task else None
        if run is None:
            return flow(**kwargs)
        from prefect.flow_engine import run_flow

        return run_flow(flow, flow_run=run, parameters=kwargs)


def _subflow_run(flow: Any, kwargs: dict[str, Any], parent_task: str) -> Any | None:
    """A Pending flow run of `flow` whose parent is the task run `parent_task`, tagged as the current tags; None
    (after a warning) when the server refuses it."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.context import TagsContext
    from prefect.states import Pending

    error: Exception | None = None
    try:
        with get_client(sync_client=True) as client:
            for attempt in range(LINK_TRIES):
                try:
                    return client.create_flow_run(flow, parameters=flow.serialize_parameters(kwargs),
                                                  parent_task_run_id=UUID(parent_task), state=Pending(),
                                                  tags=TagsContext.get().current_tags)
                except Exception as err:  # noqa: BLE001 - the task run not recorded yet, or a refusal
                    error = err
                    time.sleep(0.5 * (attempt + 1))
    except Exception as err:  # noqa: BLE001 - no client: the flow still runs
        error = err
    print(f"warning: not linked to the pipeline task run {parent_task} ({type(error).__name__}: "
          f"{one_line(str(error), 300)}); this stage's flow run is tagged with the pipeline run only", file=sys.stderr)
    return None
