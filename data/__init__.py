"""Datasets for tft2v: the synthetic Shapes world (the default), loaders for a user's own folders,
and video / image file I/O."""
