//! compose's variable substitution in values: `$VAR`, `${VAR}`, `${VAR:-default}`,
//! `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+other}`, `${VAR+other}`,
//! and `$$` for a literal `$`. Defaults may themselves hold `${...}`. Pure.

use std::collections::BTreeMap;

/// Why a value could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${VAR:?message}` or `${VAR?message}` with `VAR` unset (or empty for `:?`).
    #[error("`{var}` is required: {message}")]
    Required { var: String, message: String },
    #[error("`{text}`: {why}")]
    Syntax { text: String, why: &'static str },
}

/// The variables a compose file sees: the `.env` file's, overridden by the environment.
pub type Vars = BTreeMap<String, String>;

/// Substitute the variables in `text`. `unset` collects the names used but not set
/// (compose warns about them and substitutes an empty string).
pub fn interpolate(text: &str, vars: &Vars, unset: &mut Vec<String>) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let end = closing_brace(body_and_tail)
                .ok_or(InterpolateError::Syntax { text: text.to_string(), why: "a `${` without its `}`" })?;
            out.push_str(&expand(&body_and_tail[..end], text, vars, unset)?);
            rest = &body_and_tail[end + 1..];
        } else {
            let len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            if len == 0 || after.as_bytes()[0].is_ascii_digit() {
                // A lone `$` (e.g. at the end, or before a space) stays as it is.
                out.push('$');
                rest = after;
                continue;
            }
            out.push_str(&lookup(&after[..len], vars, unset));
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The index of the `}` that closes a `${` whose body starts `s`, counting nested `${`.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn lookup(name: &str, vars: &Vars, unset: &mut Vec<String>) -> String {
    match vars.get(name) {
        Some(v) => v.clone(),
        None => {
            if !unset.iter().any(|u| u == name) {
                unset.push(name.to_string());
            }
            String::new()
        }
    }
}

fn expand(body: &str, whole: &str, vars: &Vars, unset: &mut Vec<String>) -> Result<String, InterpolateError> {
    let len = body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
    let (name, op) = body.split_at(len);
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(InterpolateError::Syntax { text: whole.to_string(), why: "`${` must be followed by a variable name" });
    }
    let value = vars.get(name);
    let set = value.is_some();
    let non_empty = value.is_some_and(|v| !v.is_empty());
    let (colon, op) = match op.strip_prefix(':') {
        Some(rest) => (true, rest),
        None => (false, op),
    };
    let present = if colon { non_empty } else { set };
    let Some(kind) = op.chars().next() else {
        if colon {
            return Err(InterpolateError::Syntax { text: whole.to_string(), why: "`:` must be followed by -, ? or +" });
        }
        return Ok(lookup(name, vars, unset));
    };
    let arg = &op[1..];
    match kind {
        '-' if present => Ok(value.cloned().unwrap_or_default()),
        '-' => interpolate(arg, vars, unset),
        '?' if present => Ok(value.cloned().unwrap_or_default()),
        '?' => Err(InterpolateError::Required { var: name.to_string(), message: interpolate(arg, vars, unset)? }),
        '+' if present => interpolate(arg, vars, unset),
        '+' => Ok(String::new()),
        _ => Err(InterpolateError::Syntax { text: whole.to_string(), why: "use ${VAR}, ${VAR:-default}, ${VAR:?error} or ${VAR:+other}" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::from([("TAG".into(), "v2".into()), ("EMPTY".into(), String::new()), ("PORT".into(), "8080".into())])
    }

    fn run(text: &str) -> Result<String, InterpolateError> {
        interpolate(text, &vars(), &mut Vec::new())
    }

    #[test]
    fn the_forms_compose_documents() {
        assert_eq!(run("web:${TAG}").unwrap(), "web:v2");
        assert_eq!(run("web:$TAG-x").unwrap(), "web:v2-x");
        assert_eq!(run("${NOPE:-d}").unwrap(), "d");
        assert_eq!(run("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(run("${EMPTY-d}").unwrap(), "");
        assert_eq!(run("${NOPE-d}").unwrap(), "d");
        assert_eq!(run("${TAG:-d}").unwrap(), "v2");
        assert_eq!(run("${TAG:+set}${NOPE:+set}").unwrap(), "set");
        assert_eq!(run("$$TAG costs $$5").unwrap(), "$TAG costs $5");
        assert_eq!(run("${NOPE:-${PORT}}:80").unwrap(), "8080:80");
        assert_eq!(run("a $ b").unwrap(), "a $ b");
    }

    #[test]
    fn required_and_unset_variables() {
        assert_eq!(
            run("${NOPE:?set NOPE to the API key}"),
            Err(InterpolateError::Required { var: "NOPE".into(), message: "set NOPE to the API key".into() })
        );
        assert!(run("${EMPTY:?x}").is_err());
        assert_eq!(run("${EMPTY?x}").unwrap(), "");
        let mut unset = Vec::new();
        assert_eq!(interpolate("${A}$A${B}", &vars(), &mut unset).unwrap(), "");
        assert_eq!(unset, vec!["A".to_string(), "B".to_string()]);
        assert!(matches!(run("${TAG"), Err(InterpolateError::Syntax { .. })));
        assert!(matches!(run("${TAG:x}"), Err(InterpolateError::Syntax { .. })));
        assert!(matches!(run("${}"), Err(InterpolateError::Syntax { .. })));
    }
}
