"""Evaluation: metric networks (`metrics`), the benchmark runner (`runner`), the multi-view test
set (`multiview`) and baselines (`baselines`)."""
