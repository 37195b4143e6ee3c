//! Who owns the node label (`virtplane.io/node`): the controller. Its own record of a binding is
//! `status.nodeName`, which only the controller writes (the agents strip it from their status
//! writes, and tenants are given no `status` rights); the label is how the agents select their
//! objects. Pure: [`judge`] takes no client.
//!
//! - Bound (a record): the label must say the recorded node. Anyone else's edit or removal is
//!   put back, so the device's cleanup stays with the node that made it.
//! - Not bound yet: a label naming an existing node is taken as the binding (it gives no more
//!   than `spec.nodeName`, which a tenant may set anyway, and that node's agent checks the
//!   object's grants); a label naming a node that does not exist never counts and is removed.

/// What the controller does about an object's node label before anything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelAction {
    /// No label and no binding: choose a node (`binding::decide`).
    Decide,
    /// The label is the binding (recorded, or adopted now): keep it.
    Keep(String),
    /// The label differs from the controller's binding (changed or removed by someone else):
    /// write the bound node back.
    Restore {
        /// The controller's node.
        node: String,
        /// What the label said (`None`: removed).
        found: Option<String>,
    },
    /// The label names no node and there is no binding: remove it, then choose a node.
    Remove(String),
}

/// Judges `label` against the controller's record `recorded` (`status.nodeName`); `exists`
/// says whether a Hypervisor of that name exists.
pub fn judge(
    label: Option<&str>,
    recorded: Option<&str>,
    exists: impl Fn(&str) -> bool,
) -> LabelAction {
    match (label, recorded) {
        (Some(l), Some(r)) if l == r => LabelAction::Keep(r.to_string()),
        (found, Some(r)) => LabelAction::Restore {
            node: r.to_string(),
            found: found.map(str::to_string),
        },
        (None, None) => LabelAction::Decide,
        (Some(l), None) if exists(l) => LabelAction::Keep(l.to_string()),
        (Some(l), None) => LabelAction::Remove(l.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_table() {
        let exists = |n: &str| n == "a" || n == "b";
        let keep = |n: &str| LabelAction::Keep(n.into());
        let restore = |n: &str, f: Option<&str>| LabelAction::Restore {
            node: n.into(),
            found: f.map(Into::into),
        };
        type Row = (
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            LabelAction,
        );
        let rows: Vec<Row> = vec![
            ("unbound, unlabelled", None, None, LabelAction::Decide),
            ("bound and labelled", Some("a"), Some("a"), keep("a")),
            (
                "overwritten by a tenant",
                Some("b"),
                Some("a"),
                restore("a", Some("b")),
            ),
            ("removed by a tenant", None, Some("a"), restore("a", None)),
            (
                "overwritten with a node that does not exist",
                Some("ghost"),
                Some("a"),
                restore("a", Some("ghost")),
            ),
            (
                "the bound node's Hypervisor is gone: the binding holds",
                Some("c"),
                Some("c"),
                keep("c"),
            ),
            (
                "labelled before binding, node exists",
                Some("b"),
                None,
                keep("b"),
            ),
            (
                "labelled before binding, no such node",
                Some("ghost"),
                None,
                LabelAction::Remove("ghost".into()),
            ),
        ];
        for (name, label, recorded, want) in rows {
            assert_eq!(judge(label, recorded, exists), want, "{name}");
        }
    }
}
