"""Evaluation: metric networks (`metrics`); the benchmark's test sets (`testsets`), methods
(`methods`, `baselines`), runner on one host or several (`runner`) and report (`report`); the
multi-view test set (`multiview`)."""
