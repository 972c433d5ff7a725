"""Launchers: ``megatron-ivr launch {local,slurm,docker}`` on nemo-run (the ``launch`` extra).

- :mod:`launch.scripts`: the bash each node runs (servers, torchrun, requeue), no nemo-run;
- :mod:`launch.launcher`: nemo-run executors and experiments; nemo-run is imported there only,
  so trainer and rollout processes never load it.
"""
