"""Training: the run's config (config.py), the Trainer and its loop (trainer.py), the state it
owns and what a last.pt holds (state.py), building one from a config (setup.py), optimizers and
their schedule (optim.py), the NaN guard and speed figures. Plain Python: the command line is
nanogpt/train.py.
"""
