"""Training: the run's config, the Trainer (its loop and the state it owns), optimizers and their
schedule, the NaN guard and speed figures. Plain Python: the command line is nanogpt/train.py.
"""
