"""Kubeflow pipelines: they wire the components (components/) and hold every cluster setting (cluster.py).

    from pipelines.run import compile_pipeline, run_local, submit, schedule
"""
