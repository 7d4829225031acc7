import os

# The model scripts under test/models are command-line programs, not pytest tests: keep pytest out.
collect_ignore_glob = ["models/*"]

# OpenMP threads that spin while they wait take the cores from each other and from other jobs on a shared
# machine (measured on 2 cores with one other busy process: a training step 3.3x slower spinning than
# passive; idle, the same within noise). Set before torch is imported; the scripts' subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
