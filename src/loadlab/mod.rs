//! The load lab: a fault-injecting mock upstream and a benchmark driver, shipped in the
//! same binary so every figure in `docs/BENCHMARKS.md` can be reproduced offline.

pub mod bench;
pub mod mock;
