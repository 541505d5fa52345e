//! Custom ops with their backward next to their forward, one op per file.

pub mod frozen_linear;

pub use frozen_linear::frozen_linear;
