"""Parallelism: the device mesh and logical sharding rules (`sharding`), ahead-of-time memory
plans (`plan`) and process-level runtime settings (`cpu_runtime`)."""
