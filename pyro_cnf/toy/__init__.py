"""The 2-D toy layer: datasets, pictures, the demo."""
