//! The `vio` demo and benchmark tool.
fn main() {}
