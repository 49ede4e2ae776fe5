"""Exported models: `graph.py` the traceable detection graph, `files.py` writes it as ONNX or TorchScript
with its metadata, `runtime.py` (`ExportedModel`) runs such files with the eager model's pre- and
post-processing around them.

Nothing is imported here, so `import maskrcnn` (whose Predictor reads exported files through `runtime`) does
not load the exporter's dependencies."""
