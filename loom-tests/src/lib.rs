//! Loom models of the engine live in `tests/`.
