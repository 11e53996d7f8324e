"""Sliding-window inference and the predictor that maps a raw case to a segmentation."""
