"""Where the config tree and the recipes are: the repository's conf/ and experiments/, or a wheel's copies."""

from nanogpt.fileio import resource_dir

CONFIG_DIR = resource_dir("conf")
EXPERIMENTS_DIR = resource_dir("experiments")
