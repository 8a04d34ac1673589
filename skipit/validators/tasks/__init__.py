"""lm-eval tasks shipped with skipit (see :mod:`skipit.validators.lm_eval`): each folder holds a task
YAML and the local data it reads, so they run where no dataset hub is reachable."""

from pathlib import Path

#: the folder lm-eval scans for skipit's own tasks (``TaskManager(include_path=TASKS_DIR)``)
TASKS_DIR = Path(__file__).parent
