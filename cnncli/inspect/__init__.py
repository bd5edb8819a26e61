"""Looking inside a network: the per-layer summary, what a trained model computes (features, saliency, top
units), and the figures that show it."""
