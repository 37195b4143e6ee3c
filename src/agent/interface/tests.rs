//! Table tests of plan and report.
