//! Placeholder while the agents bench is written.
fn main() {}
