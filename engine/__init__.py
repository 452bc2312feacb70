"""The inference engine: compact execution of pruned networks (emptied channels dropped, BN folded,
per-layer dense/sparse paths, ONNX Runtime) and the execution plans that record which path runs where."""
