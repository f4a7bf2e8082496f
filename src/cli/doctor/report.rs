//! The report: each check's status, detail and fix, as a table for people and JSON for
//! programs.

use super::*;

/// The outcome of one check. Ordered from good to bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    /// Nothing to do.
    Ok,
    /// Works, with a caveat, or could not be checked.
    Warn,
    /// pinkeeper cannot do its job on this node until this is fixed.
    Fail,
}

impl Status {
    pub(super) fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check: what was looked at, how it stands, and what the operator should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Check {
    /// Stable identifier: `control-socket`, `containerd`, `images-dir`, `ledger`, `program`,
    /// `at-risk`.
    pub name: &'static str,
    /// How it stands.
    pub status: Status,
    /// What was found. Lines after the first list items (names, files).
    pub detail: String,
    /// What the operator should do; empty when the status is ok.
    pub fix: String,
}

impl Check {
    pub(super) fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    pub(super) fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = fix.into();
        self
    }
}

/// The doctor's findings, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// Every check made.
    pub checks: Vec<Check>,
}

/// The JSON document (documented in README.md: add fields, never rename or remove them).
#[derive(Serialize)]
pub(super) struct ReportJson<'a> {
    pub(super) version: u32,
    pub(super) status: Status,
    pub(super) checks: &'a [Check],
}

impl Report {
    /// The worst status of any check (ok for no checks).
    pub(crate) fn status(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// 0 when no check failed, 1 otherwise.
    pub(crate) fn exit_code(&self) -> u8 {
        u8::from(self.status() == Status::Fail)
    }

    /// Pretty-printed JSON: `{"version": 1, "status": "fail", "checks": [{"name", "status",
    /// "detail", "fix"}]}`.
    pub(crate) fn to_json(&self) -> String {
        let json = ReportJson {
            version: JSON_VERSION,
            status: self.status(),
            checks: &self.checks,
        };
        // Strings and enums only: serialising cannot fail.
        serde_json::to_string_pretty(&json).unwrap_or_default()
    }

    /// Human text: one block per check (status, name, the detail, the fix), then a summary.
    pub(crate) fn to_table(&self) -> String {
        let mut out = String::new();
        let indent = "       ";
        for check in &self.checks {
            out.push_str(&format!("{:<6} {}\n", check.status.label(), check.name));
            wrap_into(&mut out, indent, "", &check.detail);
            if !check.fix.is_empty() {
                wrap_into(&mut out, indent, "fix: ", &check.fix);
            }
            out.push('\n');
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        out.push_str(&format!(
            "{} failed, {} warning(s), {} ok\n",
            count(Status::Fail),
            count(Status::Warn),
            count(Status::Ok)
        ));
        out
    }
}

/// Appends `text` word-wrapped to [`TEXT_WIDTH`], every line indented; `lead` starts the first
/// line and the lines after it hang past it. `\n` in the text starts a new line; a line's own
/// leading spaces (list items, `  - name`) are kept on its continuation lines.
pub(super) fn wrap_into(out: &mut String, indent: &str, lead: &str, text: &str) {
    let hang = " ".repeat(lead.chars().count());
    for (i, paragraph) in text.split('\n').enumerate() {
        let body = paragraph.trim_start_matches(' ');
        let pad = " ".repeat(paragraph.len() - body.len());
        let item = if body.starts_with("- ") { "  " } else { "" };
        let first = format!("{indent}{}{pad}", if i == 0 { lead } else { &hang });
        let continuation = format!("{indent}{hang}{pad}{item}");
        let mut line = first;
        let mut fresh = true;
        let mut words: Vec<String> = body
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        // A list marker stays with its item: never a lone `-` at the end of a line.
        if words.len() > 1 && words[0] == "-" {
            let item = words.remove(1);
            words[0] = format!("- {item}");
        }
        for word in &words {
            if !fresh && line.chars().count() + 1 + word.chars().count() > TEXT_WIDTH {
                out.push_str(&line);
                out.push('\n');
                line = continuation.clone();
                fresh = true;
            }
            if !fresh {
                line.push(' ');
            }
            line.push_str(word);
            fresh = false;
        }
        out.push_str(&line);
        out.push('\n');
    }
}
