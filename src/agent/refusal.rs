//! One vocabulary for "no" across the agent's kinds: a reason from the kind's own enum, a message
//! a person can act on, and when to look again.

use std::fmt::Debug;
use std::time::Duration;

use kube::runtime::controller::Action;

/// The reasons one kind reports in its conditions, as an exhaustive enum, so that metrics and
/// Event labels are a closed set.
pub trait Reason: Copy + Debug + Eq + Send + Sync + 'static {
    /// Every reason of the kind (for tests and for documenting them).
    const ALL: &'static [Self];

    /// The CamelCase reason as conditions and Events show it.
    fn as_str(self) -> &'static str;

    /// Whether this reason means "waiting as asked" rather than a failure (no Warning Event).
    fn waiting(self) -> bool {
        false
    }
}

/// When a refused object is looked at again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Only when the object (or what it waits for) changes: a spec the user must fix.
    OnChange,
    /// After this long, events or not (something outside the spec may fix it).
    After(Duration),
}

impl Retry {
    /// The controller action.
    pub fn action(self) -> Action {
        match self {
            Self::OnChange => Action::await_change(),
            Self::After(d) => Action::requeue(d),
        }
    }
}

/// Why a kind's plan will not go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal<R: Reason> {
    /// The reason.
    pub reason: R,
    /// What is wrong and what to do, in a sentence; nothing about other tenants.
    pub message: String,
    /// When to look again.
    pub retry: Retry,
}

impl<R: Reason> Refusal<R> {
    /// A refusal that waits for the user to change the spec.
    pub fn fix(reason: R, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retry: Retry::OnChange,
        }
    }

    /// A refusal looked at again after `after` (something outside the spec may fix it).
    pub fn wait(reason: R, message: impl Into<String>, after: Duration) -> Self {
        Self {
            reason,
            message: message.into(),
            retry: Retry::After(after),
        }
    }
}

/// Asserts that every reason of `R` has a distinct, CamelCase name (for each kind's tests).
#[cfg(test)]
pub fn assert_reasons<R: Reason>() {
    let mut seen = std::collections::HashSet::new();
    for r in R::ALL {
        let s = r.as_str();
        assert!(
            s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && s.chars().all(|c| c.is_ascii_alphanumeric()),
            "{s} is not CamelCase"
        );
        assert!(seen.insert(s), "{s} twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_map_to_actions() {
        assert_eq!(Retry::OnChange.action(), Action::await_change());
        assert_eq!(
            Retry::After(Duration::from_secs(5)).action(),
            Action::requeue(Duration::from_secs(5))
        );
    }
}
