//! What `/api/v1/diagnosis` serves: the troubleshooting rules' findings over a window.

use serde::{Deserialize, Serialize};

use super::request::Label;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub rule: Label,
    pub severity: Label,
    pub summary: String,
    pub evidence: Vec<String>,
    pub action: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub window_seconds: f64,
    pub instances: Vec<String>,
    pub findings: Vec<Finding>,
    /// Rules that could not be evaluated, and why.
    pub not_evaluated: Vec<(String, String)>,
}
