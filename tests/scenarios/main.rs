//! Whole-farm scenarios: what users do, end to end, with real parts.

mod step_author;
