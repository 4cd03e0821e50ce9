"""MLflow look-ups shared by the stages."""

from __future__ import annotations

import os

import mlflow


def find_run_id(tracking_uri: str, experiment_name: str, run_name: str) -> str | None:
    """The id of the newest run called ``run_name`` in ``experiment_name``, or None if there is none.

    ``MLFLOW_TRACKING_URI`` wins over ``tracking_uri``, as in MONAI's ``MLFlowHandler``.
    """
    client = mlflow.MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
