"""rlhf_online: learn a chat model from human preferences, live.

No OpenMP wait policy is set here (an earlier version set OMP_WAIT_POLICY=PASSIVE for the whole process).
torch and llama.cpp share one libgomp in this process (torch's bundled copy; xllamacpp links the same soname),
so a policy chosen for one applies to both, and PASSIVE made llama.cpp 5-8x slower (a futex sleep and wake at
every barrier of every graph op: 13 tok/s instead of 75-100 for one answer on 2 cores, measured here). The case
PASSIVE was for, a multi-threaded torch pool stalled by a core the other process took, does not arise: the
trainer runs torch (and its own llama.cpp sampler) on one thread (`--trainer-threads 1`) at the lowest OS
priority, and libgomp's default policy spins only briefly before it sleeps. A user can still set the variable.
"""
