"""Celery workers: the app factory, the resident model runtime, the cross-job batcher, tasks and launchers.

Importing this package imports neither torch nor a model; `launch.run_worker` starts a worker process.
"""
