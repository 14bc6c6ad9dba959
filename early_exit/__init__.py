"""Contracts shared by training, export and serving.

Nothing here imports torch: the TorchServe handler, the exporter and offline
evaluation all use the same exit policy (`policy`) and the same manifest
schema (`manifest`), so that "accuracy through HTTP equals the offline figure"
holds by construction.
"""
