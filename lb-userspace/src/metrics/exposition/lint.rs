//! A strict check of a text exposition (format 0.0.4) and of this project's conventions, for
//! tests: common parsers skip what they do not understand, this one names the line instead.
//!
//! Checked: every line is a `# HELP`, a `# TYPE` or a sample; each family has exactly one HELP
//! and then one TYPE line before its samples, and appears once; sample names belong to the
//! family announced last (`_bucket`, `_sum`, `_count` for histograms); names, label names and
//! quoted label values (escapes `\\`, `\"`, `\n` only) are well formed; values are numbers;
//! no series appears twice; counters end in `_total` and are not negative.

use std::collections::{BTreeMap, BTreeSet};

/// One series: its sample name and its labels, sorted by name.
pub type Series = (String, BTreeMap<String, String>);

/// A checked exposition: each family's type, and every sample's value.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<Series, f64>,
}

impl Exposition {
    /// The value of the sample `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("line {line} {text:?}: {problem}")]
pub struct LintError {
    /// 1-based.
    pub line: usize,
    pub text: String,
    pub problem: String,
}

/// Where a family is in its header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Header {
    Help,
    Typed,
}

/// Checks `text`; returns the families' types and the samples.
pub fn lint(text: &str) -> Result<Exposition, LintError> {
    let mut out = Exposition::default();
    // The family being read: name, header progress, type.
    let mut current: Option<(String, Header, String)> = None;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(LintError {
            line: text.lines().count(),
            text: text.lines().last().unwrap_or_default().to_owned(),
            problem: "the last line has no line feed".to_owned(),
        });
    }
    for (i, line) in text.lines().enumerate() {
        let fail = |problem: String| LintError {
            line: i + 1,
            text: line.to_owned(),
            problem,
        };
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| fail("HELP without text".to_owned()))?;
            check_name(name, true).map_err(&fail)?;
            if help.trim().is_empty() {
                return Err(fail("empty HELP".to_owned()));
            }
            if !seen.insert(name.to_owned()) {
                return Err(fail(format!("family {name} appears twice")));
            }
            current = Some((name.to_owned(), Header::Help, String::new()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| fail("TYPE without a type".to_owned()))?;
            match &current {
                Some((family, Header::Help, _)) if family == name => {}
                _ => return Err(fail(format!("TYPE of {name} not right after its HELP"))),
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(fail(format!("unknown type {kind:?}")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(fail(format!("counter {name} does not end in _total")));
            }
            out.types.insert(name.to_owned(), kind.to_owned());
            current = Some((name.to_owned(), Header::Typed, kind.to_owned()));
        } else if line.starts_with('#') || line.trim().is_empty() {
            return Err(fail("neither HELP, TYPE nor a sample".to_owned()));
        } else {
            let Some((family, Header::Typed, kind)) = &current else {
                return Err(fail("sample before its family's HELP and TYPE".to_owned()));
            };
            let (name, labels, value) = sample(line).map_err(&fail)?;
            let suffixes: &[&str] = match kind.as_str() {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            if !suffixes.iter().any(|s| format!("{family}{s}") == name) {
                return Err(fail(format!("sample {name} outside its family {family}")));
            }
            if name.ends_with("_bucket") && !labels.contains_key("le") {
                return Err(fail("bucket without le".to_owned()));
            }
            if kind == "counter" && value.is_sign_negative() {
                return Err(fail("negative counter".to_owned()));
            }
            if out.samples.insert((name, labels), value).is_some() {
                return Err(fail("series appears twice".to_owned()));
            }
        }
    }
    if let Some((family, Header::Help, _)) = current {
        return Err(LintError {
            line: text.lines().count(),
            text: String::new(),
            problem: format!("family {family} has no TYPE"),
        });
    }
    Ok(out)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names; label names take no `:`.
fn check_name(name: &str, metric: bool) -> Result<(), String> {
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (metric && c == ':');
    let ok = |c: char| ok_first(c) || c.is_ascii_digit();
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if ok_first(c) && chars.all(ok) => Ok(()),
        _ => Err(format!("bad name {name:?}")),
    }
}

/// `name{labels} value`: the name, the labels unescaped and the value.
fn sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
    let name = &line[..name_end];
    check_name(name, true)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest.split_once("=\"").ok_or("label without =\"")?;
            check_name(label, false)?;
            let (value, after) = quoted(after)?;
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            rest = after.strip_prefix(',').unwrap_or(after);
            if !rest.starts_with('}') && after.len() == rest.len() {
                return Err("labels not separated by ,".to_owned());
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    // No timestamps: lbd never sets them.
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .map_err(|_| format!("value {v:?} is not a number"))?,
    };
    Ok((name.to_owned(), labels, value))
}

/// A label value up to its closing quote, unescaped; and what follows the quote.
fn quoted(s: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                other => return Err(format!("bad escape \\{:?}", other.map(|(_, c)| c))),
            },
            c => value.push(c),
        }
    }
    Err("label value without its closing quote".to_owned())
}
