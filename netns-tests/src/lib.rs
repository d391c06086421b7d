//! Shared helpers for the namespace and VM test suites live in tests/common.
