"""Where and how a process runs: its device and precision (device.py), its place in a torchrun or SLURM
job (distributed.py; FSDP's sharding, sharding.py), both settled for a training run (process.py), and stop
signals (stops.py).
"""
