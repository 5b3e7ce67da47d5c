//! Route table tests.
