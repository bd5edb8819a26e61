"""Transfer learning: fine-tuning a trained run on new data (freezing, new heads, LwF) and importing PyTorch weights."""
