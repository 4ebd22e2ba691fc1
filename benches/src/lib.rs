//! Baselines for the benchmarks.
