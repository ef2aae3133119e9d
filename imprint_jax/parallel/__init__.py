"""Parallelism: the device mesh and logical sharding rules, including the batch and head splits
of activations (`sharding`), the compile target and its XLA options (`compiler`), ahead-of-time
memory plans (`plan`) and process-level runtime settings (`cpu_runtime`)."""
