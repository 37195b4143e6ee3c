//! Pure computation of metav1 Conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition a reconciler wants to report, before its transition time is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    /// Condition type, for example `Ready`.
    pub type_: &'a str,
    /// Whether the condition holds.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// A sentence a person can act on.
    pub message: String,
}

impl<'a> Desired<'a> {
    /// A condition that holds.
    pub fn truthy(type_: &'a str, reason: &'a str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: true,
            reason,
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn falsy(type_: &'a str, reason: &'a str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: false,
            reason,
            message: message.into(),
        }
    }
}

/// Turns desired conditions into metav1 Conditions, keeping `lastTransitionTime` of a condition
/// whose status did not change and stamping `now` on the others.
pub fn compute(
    existing: &[Condition],
    desired: &[Desired<'_>],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" };
            let last_transition_time = existing
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: d.type_.to_string(),
                status: status.to_string(),
                reason: d.reason.to_string(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The condition of the given type, if present.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("valid timestamp")
    }

    #[test]
    fn keeps_transition_time_when_status_unchanged() {
        let first = compute(
            &[],
            &[Desired::truthy("Ready", "Connected", "ok")],
            Some(1),
            at(100),
        );
        let second = compute(
            &first,
            &[Desired::truthy("Ready", "Connected", "still ok")],
            Some(2),
            at(200),
        );
        assert_eq!(second[0].last_transition_time, Time(at(100)));
        assert_eq!(second[0].message, "still ok");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn stamps_new_time_when_status_flips() {
        let first = compute(
            &[],
            &[Desired::truthy("Ready", "Connected", "ok")],
            None,
            at(100),
        );
        let second = compute(
            &first,
            &[Desired::falsy("Ready", "LibvirtUnavailable", "down")],
            None,
            at(300),
        );
        assert_eq!(second[0].status, "False");
        assert_eq!(second[0].last_transition_time, Time(at(300)));
        assert!(!is_true(&second, "Ready"));
        assert!(is_true(&first, "Ready"));
    }
}
