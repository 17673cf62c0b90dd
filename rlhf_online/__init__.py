"""rlhf_online: learn a chat model from human preferences, live."""

import os

# Chat generation and the trainer share 2 CPU cores. With OpenMP's default spin-waiting, a thread pool whose
# threads are descheduled by the other process stalls at every barrier: measured here, one PPO iteration took
# 200 s instead of 25 s. Passive waiting yields the core instead. Must be set before torch's first parallel op.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
