//! `[[matrix]]`: one builder per combination of axis values, from a builder template in which
//! `{AXIS}` is replaced in every string.
//!
//! Placeholders are `{NAME}` with NAME a name of letters, digits and `_`. Nothing else is
//! touched, so shell and JSON braces survive; `${NAME}` (shell syntax) is left alone and
//! `{{NAME}}` gives a literal `{NAME}`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::builders::MatrixCell;
use super::check::{Ctx, list};
use super::error::quote;
use super::schema::{BuilderEntry, MatrixEntry};

/// A builder a matrix generates: its name, its entry with the axes replaced, its cell.
pub(crate) struct Generated {
    pub name: String,
    pub entry: BuilderEntry,
    pub cell: MatrixCell,
}

/// One piece of a template string.
enum Piece<'a> {
    Text(&'a str),
    Axis(&'a str),
}

fn ident_len(s: &str) -> usize {
    let mut n = 0;
    for (i, c) in s.char_indices() {
        let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        n = i + c.len_utf8();
    }
    n
}

/// Splits a template string into text and placeholders.
fn pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut text_start = 0;
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < s.len() {
        if bytes[i] != b'{' {
            i += 1;
            continue;
        }
        // `{{NAME}}`: a literal `{NAME}`.
        if s[i..].starts_with("{{") {
            let n = ident_len(&s[i + 2..]);
            if n > 0 && s[i + 2 + n..].starts_with("}}") {
                out.push(Piece::Text(&s[text_start..i]));
                out.push(Piece::Text(&s[i + 1..i + 2 + n + 1]));
                i += n + 4;
                text_start = i;
                continue;
            }
        }
        let n = ident_len(&s[i + 1..]);
        let after_dollar = i > 0 && bytes[i - 1] == b'$';
        if n > 0 && !after_dollar && s[i + 1 + n..].starts_with('}') {
            out.push(Piece::Text(&s[text_start..i]));
            out.push(Piece::Axis(&s[i + 1..i + 1 + n]));
            i += n + 2;
            text_start = i;
            continue;
        }
        i += 1;
    }
    out.push(Piece::Text(&s[text_start..]));
    out
}

/// The axes a string uses.
fn axes_used(s: &str) -> Vec<&str> {
    pieces(s)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Axis(a) => Some(a),
            Piece::Text(_) => None,
        })
        .collect()
}

/// The string with every placeholder replaced (all axes are known by now).
fn substitute(s: &str, values: &BTreeMap<String, String>) -> String {
    pieces(s)
        .into_iter()
        .map(|p| match p {
            Piece::Text(t) => t,
            Piece::Axis(a) => values.get(a).map_or("", String::as_str),
        })
        .collect()
}

/// Calls `f` on every string of `v` with its key path.
fn each_string(v: &toml::Value, key: &str, f: &mut dyn FnMut(&str, &str)) {
    match v {
        toml::Value::String(s) => f(key, s),
        toml::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                each_string(item, &format!("{key}[{i}]"), f);
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t {
                each_string(item, &format!("{key}.{}", segment(k)), f);
            }
        }
        _ => {}
    }
}

fn segment(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        quote(k)
    }
}

fn substitute_value(v: &mut toml::Value, values: &BTreeMap<String, String>) {
    match v {
        toml::Value::String(s) => *s = substitute(s, values),
        toml::Value::Array(items) => items.iter_mut().for_each(|i| substitute_value(i, values)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, i)| substitute_value(i, values)),
        _ => {}
    }
}

/// Expands the matrix at `matrix[index]`; on any problem, records it and generates nothing.
pub(crate) fn expand(ctx: &mut Ctx, index: usize, m: MatrixEntry) -> Vec<Generated> {
    let key = format!("matrix[{index}]");
    let errors_before = ctx.error_count();
    let axis_names = || list(m.axes.keys());

    if m.axes.is_empty() {
        ctx.error(
            format!("{key}.axes"),
            "has no axis; give at least one, as axes = { os = [\"linux\", \"freebsd\"] }",
        );
    }
    for (axis, values) in &m.axes {
        let akey = format!("{key}.axes.{}", segment(axis));
        if ident_len(axis) != axis.len() {
            ctx.error(
                &akey,
                format!(
                    "axis name {} is not a name; use letters, digits and '_', not starting with a digit",
                    quote(axis)
                ),
            );
        }
        if values.is_empty() {
            ctx.error(&akey, "has no values; give at least one");
        }
        for (i, v) in values.iter().enumerate() {
            if v.is_empty() {
                ctx.error(&akey, "has an empty value; remove it");
            } else if values[..i].contains(v) {
                ctx.error(&akey, format!("lists {} twice", quote(v)));
            }
        }
    }

    // Every placeholder must name an axis; the name must use every axis.
    let unknown = |ctx: &mut Ctx, at: &str, s: &str| {
        for a in axes_used(s) {
            if !m.axes.contains_key(a) {
                ctx.error(
                    at,
                    format!(
                        "{{{a}}} names no axis (axes: {}); write {{{{{a}}}}} for a literal {{{a}}}",
                        axis_names()
                    ),
                );
            }
        }
    };
    unknown(ctx, &format!("{key}.name"), &m.name);
    for axis in m.axes.keys() {
        if !axes_used(&m.name).contains(&axis.as_str()) {
            ctx.error(
                format!("{key}.name"),
                format!(
                    "{} does not use axis {}; the name must use every axis ({}) so that each builder's name is different",
                    quote(&m.name),
                    quote(axis),
                    list(m.axes.keys().map(|a| format!("{{{a}}}")))
                ),
            );
        }
    }
    let bkey = format!("{key}.builder");
    if m.builder.name.is_some() {
        ctx.error(
            format!("{bkey}.name"),
            "remove it; the matrix's name template names its builders",
        );
    }
    let template = match toml::Value::try_from(&m.builder) {
        Ok(t) => t,
        Err(e) => {
            ctx.error(&bkey, format!("cannot be used as a template: {e}"));
            return Vec::new();
        }
    };
    each_string(&template, &bkey, &mut |at, s| unknown(ctx, at, s));

    // The combinations: every product of the axes' values, less the excluded, plus the
    // included.
    for (i, ex) in m.exclude.iter().enumerate() {
        let ekey = format!("{key}.exclude[{i}]");
        if ex.is_empty() {
            ctx.error(
                &ekey,
                "is empty, which would exclude everything; give axis values",
            );
        }
        for (axis, value) in ex {
            match m.axes.get(axis) {
                None => ctx.error(
                    &ekey,
                    format!("{} is not an axis (axes: {})", quote(axis), axis_names()),
                ),
                Some(values) if !values.contains(value) => ctx.error(
                    &ekey,
                    format!(
                        "{} is not a value of axis {} ({})",
                        quote(value),
                        quote(axis),
                        list(values)
                    ),
                ),
                Some(_) => {}
            }
        }
    }
    for (i, inc) in m.include.iter().enumerate() {
        let ikey = format!("{key}.include[{i}]");
        for axis in inc.keys() {
            if !m.axes.contains_key(axis) {
                ctx.error(
                    &ikey,
                    format!("{} is not an axis (axes: {})", quote(axis), axis_names()),
                );
            }
        }
        for axis in m.axes.keys() {
            match inc.get(axis) {
                None => ctx.error(
                    &ikey,
                    format!(
                        "gives no value for axis {}; an included combination gives every axis",
                        quote(axis)
                    ),
                ),
                Some(v) if v.is_empty() => {
                    ctx.error(&ikey, format!("the value of axis {} is empty", quote(axis)));
                }
                Some(_) => {}
            }
        }
    }
    if ctx.error_count() > errors_before {
        return Vec::new();
    }

    let mut cells: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
    for (axis, values) in &m.axes {
        cells = cells
            .into_iter()
            .flat_map(|cell| {
                values.iter().map(move |v| {
                    let mut c = cell.clone();
                    c.insert(axis.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    cells.retain(|c| {
        !m.exclude
            .iter()
            .any(|ex| ex.iter().all(|(a, v)| &c[a] == v))
    });
    for inc in &m.include {
        if !cells.contains(inc) {
            cells.push(inc.clone());
        }
    }
    if cells.is_empty() {
        ctx.warn(
            &key,
            "every combination is excluded, so the matrix generates no builder",
        );
    }

    let mut out = Vec::new();
    for values in cells {
        let mut value = template.clone();
        substitute_value(&mut value, &values);
        let name = substitute(&m.name, &values);
        match BuilderEntry::deserialize(value) {
            Ok(entry) => out.push(Generated {
                name,
                entry,
                cell: MatrixCell {
                    matrix: m.name.clone(),
                    values,
                },
            }),
            Err(e) => ctx.error(&bkey, format!("builder {}: {}", quote(&name), e.message())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let v: BTreeMap<String, String> = [("os".to_string(), "linux".to_string())].into();
        assert_eq!(substitute("test-{os}", &v), "test-linux");
        assert_eq!(substitute("${os} {{os}} {os", &v), "${os} {os} {os");
        assert_eq!(substitute("awk '{print $1}' {}", &v), "awk '{print $1}' {}");
        assert_eq!(axes_used("{a}-{b_2}/{3x}{}"), vec!["a", "b_2"]);
        assert_eq!(substitute("é{os}é", &v), "élinuxé");
    }
}
