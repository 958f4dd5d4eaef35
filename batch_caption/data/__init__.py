"""Datasets: synthetic scenes, readers, record codecs."""
