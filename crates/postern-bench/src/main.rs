//! Postern benchmark tool (in progress).

fn main() {}
