//! The step a validation is at, so that a timeout can name the address or
//! record the validator was waiting for.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::problem::{Problem, ProblemType};

/// The current step of one validation.
pub(super) struct Progress {
    step: Mutex<Step>,
}

struct Step {
    /// The problem type of a timeout during this step.
    kind: ProblemType,
    /// Description of the awaited event, as a phrase such as "connecting to
    /// 192.0.2.1:80".
    description: String,
}

impl Progress {
    pub(super) fn new() -> Progress {
        let step = Step { kind: ProblemType::Connection, description: "starting".to_owned() };
        Progress { step: Mutex::new(step) }
    }

    /// Records the step that starts now.
    pub(super) fn set(&self, kind: ProblemType, description: String) {
        let mut step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        *step = Step { kind, description };
    }

    /// Builds the problem for a validation cut off after `timeout`.
    pub(super) fn timed_out(&self, timeout: Duration) -> Problem {
        let step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        Problem::new(step.kind, format!("validation timed out after {timeout:?} while {}", step.description))
    }
}
