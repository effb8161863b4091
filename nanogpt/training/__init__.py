"""Training: the run's config (config.py), the Trainer, its loop and the state it owns (trainer.py;
state.py: random generators and a last.pt read back), building one from a config (setup.py),
optimizers and their schedule (optim.py), the NaN guard and speed figures. Plain Python: the
command line is nanogpt/train.py.
"""
