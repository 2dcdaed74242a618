"""Replay of datasets and scenarios into the samples (and labels) topics."""
