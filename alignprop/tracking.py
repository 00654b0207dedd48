"""Experiment tracking. (Interface used by the trainers; the MLflow implementation is being written.)

    tracker = start_run(config.to_dict(), run_type="train", tracking_uri=config.tracking_uri, enabled=...)
    tracker.log_metrics({"reward_mean": ...}, step=step)
    tracker.log_images("samples", images_0_1_tensor, step=step)
    tracker.finish(output_dir, status="FINISHED" | "FAILED")   # logs the adapter directory on success
"""

from __future__ import annotations


class NullTracker:
    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_images(self, name: str, images, step: int) -> None:
        pass

    def finish(self, output_dir=None, status: str = "FINISHED") -> None:
        pass


def start_run(params: dict, run_type: str, tracking_uri: str | None = None, enabled: bool = True, **_):
    return NullTracker()
