"""cnncli: train, evaluate, fine-tune, inspect and attack convolutional image classifiers."""

__version__ = "0.1.0"
