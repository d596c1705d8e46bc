"""Bitrate-vs-accuracy evaluation: sweeps, tables, plots and the CI regression gate.

    from cdlcodec.evaluation import get_task, run_sweep
    results = run_sweep(get_task("lenet5-mnist"), [{"method": "nearest", "rel_step": [0.05, 0.2]}])

Modules: tasks (what is evaluated), methods (how a model is compressed), rates (eq. 41), sweep
(running points), report (table / CSV / JSON), plot (PNG), gate (baseline comparison).
Heavy libraries (torch, matplotlib) are imported only when used.
"""
from .methods import METHODS, Compressed, Method, get_method, register
from .sweep import PointSpec, expand, load_recipe, run_recipe, run_sweep
from .tasks import BUILTIN_TASKS, Task, TaskData, get_task

__all__ = ["METHODS", "Compressed", "Method", "get_method", "register", "PointSpec", "expand", "load_recipe",
           "run_recipe", "run_sweep", "BUILTIN_TASKS", "Task", "TaskData", "get_task"]
